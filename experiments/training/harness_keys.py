"""The keys of lm-evaluation-harness tasks during training (`config.train.evals`) and their checks; the runner is
experiments/training/harness_evals.py, the backend experiments/training/harness_backend.py."""

import dataclasses
import importlib.util
import os

from data.config_fields import field

SHIPPED_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "evaluation", "harness_tasks")


@dataclasses.dataclass(frozen=True)
class HarnessEvalKeys:
    tasks: str = ""  # lm_eval task names, comma-separated; "": none
    every: int = field(0, min=0)  # steps between evaluations; 0: at the last step only
    limit: int = field(0, min=0)  # documents per task; 0: all
    num_fewshot: int = field(-1, min=-1)  # examples per prompt; -1: each task's own
    include_path: str = ""  # a folder of task YAML files (the shipped tasks are always included)
    batch_size: int = field(8, min=1)  # requests per forward pass


def task_names(keys) -> list[str]:
    return [t.strip() for t in keys.tasks.split(",") if t.strip()]


def problems(config) -> list[str]:
    if not task_names(config.train.evals):
        return []
    p = []
    if importlib.util.find_spec("lm_eval") is None:
        p.append(f"train.evals.tasks={config.train.evals.tasks!r} needs lm_eval: pip install -e '.[eval]'")
    if "tokenizer" not in config.data:
        p.append(f"train.evals.tasks with data.name={config.data.name!r}: lm_eval scores text, which needs a "
                 "language model whose config.data names its tokenizer (data.name='text')")
    return p
