"""Weights & Biases beside TensorBoard (`config.train.wandb`, the `wandb` extra): every event the run writes to
metrics.jsonl is logged to one W&B run per workdir, as `SPLIT/KEY` against `step` (the training step, W&B's x axis
for every chart).

- Identity: the W&B run id W&B draws at the first start is kept in WORKDIR/wandb_run.json; a resumed run reopens
  that id (`resume="allow"`), so its charts continue instead of starting a second run. The run's config is the
  resolved config (config.json) with the data's identity (data.json) under `data_identity` and the workdir's path.
- Steps: logged as a metric, not as W&B's own counter, which refuses a step below its last: a resumed run logs again
  the steps between its checkpoint and the kill (as metrics.jsonl does), and W&B keeps both points.
- `mode="offline"` writes only WORKDIR/wandb/ (what the tests use); `wandb sync WORKDIR/wandb/offline-run-*`
  uploads it later, into the one run the id names.

Only process 0 logs.
"""

import dataclasses
import importlib.util
import json
import os

from data.config_fields import field
from experiments.training import run_record

ID_FILE = "wandb_run.json"


@dataclasses.dataclass(frozen=True)
class WandbKeys:
    project: str = ""  # a W&B project to log to; "": no W&B logging
    entity: str = ""  # the team or user owning the project; "": the logged-in user's default
    name: str = ""  # the run's display name; "": the workdir's folder name
    tags: str = ""  # comma-separated
    mode: str = field("online", choices=("online", "offline"))  # offline: files in WORKDIR/wandb only


def problems(config) -> list[str]:
    keys = config.train.wandb
    if keys.project and importlib.util.find_spec("wandb") is None:
        return [f"train.wandb.project={keys.project!r} needs wandb: pip install -e '.[wandb]'"]
    return []


def recorded_id(workdir: str) -> str | None:
    """The W&B run id an earlier start of this workdir recorded, if any."""
    path = os.path.join(workdir, ID_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["id"]


class WandbRun:
    """One workdir's W&B run: `log` one event, `finish` at the end of the process."""

    def __init__(self, keys, workdir: str, config: dict, data_identity: dict):
        import wandb

        earlier = recorded_id(workdir)
        self._run = wandb.init(
            project=keys.project, entity=keys.entity or None, name=keys.name or os.path.basename(os.path.abspath(workdir)),
            tags=[t.strip() for t in keys.tags.split(",") if t.strip()], mode=keys.mode, dir=workdir,
            id=earlier, resume="allow" if earlier else None,
            config={**config, "data_identity": data_identity, "workdir": os.path.abspath(workdir)})
        if not earlier:
            run_record.write_json(os.path.join(workdir, ID_FILE), {"id": self._run.id})
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    @property
    def id(self) -> str:
        return self._run.id

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        self._run.log({"step": step, **{f"{split}/{key}": value for key, value in values.items()}})

    def finish(self) -> None:
        self._run.finish()


def open_run(config, workdir: str, resolved: dict, data_identity: dict) -> WandbRun | None:
    """The run's W&B logger, or None when `train.wandb.project` is unset."""
    keys = config.train.wandb
    return WandbRun(keys, workdir, resolved, data_identity) if keys.project else None
