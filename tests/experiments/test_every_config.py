"""Every config file in experiments/configs/ trains 3 steps from a clone, with the smallest overrides it needs:
a global batch the 8 test devices divide, no evaluation before the end, at most a few hundred generated
problems (the shipped official splits are read whole), and for the configs that start from
another run (an SFT start, a lookup model, an activation store, a policy's labelled solutions) that run, made here at
the same 3 steps."""

import glob
import importlib
import os

import pytest

from experiments.analysis import activation_store
from experiments.test_time import label
from experiments.training import metrics_writer, trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "experiments", "configs", "*.py"))
                      if os.path.basename(p) not in ("__init__.py", "base.py"))
# config -> (argument, what it starts from: (config file, argument, how the start is handed over))
SMALLEST_SETS = {"train_examples": 256, "eval_examples": 64, "test_examples": 64, "train_games": 256, "test_games": 64}
STARTS = {"sae": ("topk", ("default", None, "store")), "preference": ("arithmetic,dpo", ("preference", None, "init")),
          "grpo": ("outcome", ("grpo", "sft", "init")), "verifier": ("process", ("grpo", "sft", "labels"))}


def _three_steps(name: str, arg=None):
    config = importlib.import_module(f"experiments.configs.{name}").get_config(*([arg] if arg else []))
    config.train.update(steps=3, log_every=1, eval_every=0, checkpoint_every=3)
    for key in ("batch_size", "eval_batch_size"):
        if config.data.get(key, -1) not in (-1,) and config.data[key] % 8:
            config.data[key] = 8 * max(1, config.data[key] // 8)
    for key, most in SMALLEST_SETS.items():  # generated data sets: drawing 17,886 problems alone takes 20 s
        if key in config.data:
            config.data[key] = min(config.data[key], most)
    return config


@pytest.mark.slow  # a compile and 3 steps each (the default suite validates every config with every family)
@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_trains_three_steps(name, tmp_path):
    arg, start = STARTS.get(name, (None, None))
    config = _three_steps(name, arg)
    if start:
        start_name, start_arg, handover = start
        start_dir = str(tmp_path / "start")
        trainer.train_and_evaluate(_three_steps(start_name, start_arg), start_dir, verbose=False)
        if handover == "store":
            config.data.store = str(tmp_path / "store")
            activation_store.write(start_dir, config.data.store, "mlp_hidden", 0, "train", batches=2, batch_size=64)
            config.data.batch_size = 128  # the small store's rows hold no batch of 1,024
        elif handover == "labels":
            config.data.path = str(tmp_path / "labels.npz")
            label.label_run(start_dir, config.data.path, problems=20, samples=4, rollouts=2)
            config.data.batch_size = 16  # 72 training solutions
        else:
            config.train.init_from = start_dir
    result = trainer.train_and_evaluate(config, str(tmp_path / "run"), verbose=False)
    events = metrics_writer.read(str(tmp_path / "run"), "train")
    assert result["step"] == 3 and [e["step"] for e in events] == [1, 2, 3], name
