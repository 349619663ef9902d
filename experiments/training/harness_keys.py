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


def task_manager(tasks: list[str], paths: list[str]):
    """An lm_eval TaskManager that knows `tasks`: the shipped and `paths`' task files alone when they define them all
    (indexing the harness's thousands of task files takes ~10 s), else with the harness's own tasks too."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=paths, include_defaults=False)
    if all(local.match_tasks([task]) for task in tasks):
        return local
    return TaskManager(include_path=paths)


def unknown_tasks(tasks: list[str], paths: list[str]) -> list[str]:
    manager = task_manager(tasks, paths)
    return [t for t in tasks if not manager.match_tasks([t])]


def problems(config) -> list[str]:
    keys = config.train.evals
    if not task_names(keys):
        return []
    if importlib.util.find_spec("lm_eval") is None:
        return [f"train.evals.tasks={keys.tasks!r} needs lm_eval: pip install -e '.[eval]'"]
    if "tokenizer" not in config.data:
        return [f"train.evals.tasks with data.name={config.data.name!r}: lm_eval scores text, which needs a "
                "language model whose config.data names its tokenizer (data.name='text')"]
    if keys.include_path and not os.path.isdir(keys.include_path):
        return [f"train.evals.include_path={keys.include_path!r} is not a folder of task files"]
    missing = unknown_tasks(task_names(keys), [SHIPPED_TASKS] + ([keys.include_path] if keys.include_path else []))
    if missing:
        return [f"train.evals.tasks names {missing}, which no task folder defines (the shipped ones: "
                "shakespeare_next_line, shakespeare_complete, shakespeare_rolling; set train.evals.include_path for "
                "your own)"]
    return []
