"""The keys every experiment has (docs/interfaces.md), with defaults; experiment configs start from here.

Every section is a dataclass whose fields declare their defaults and valid values (data/config_fields.py):
`config.model` the family's (`models.MODELS`), `config.data` the dataset's (`data.DATASETS`),
`config.train` below, `config.optimizer` (experiments/optim/optimizers.py) and `config.mesh`
(experiments/training/sharding.py), so the config, its checks and the code cannot drift apart.
"""

import dataclasses
import functools

import ml_collections

import data
import models
from experiments import objectives
from experiments.optim import optimizers
from experiments.training import sharding
from experiments.posttrain.lora import LoRAConfig
from experiments.training.harness_keys import HarnessEvalKeys
from experiments.training.wandb_run import WandbKeys
from data.config_fields import field, problems as field_problems


@dataclasses.dataclass(frozen=True)
class TrainKeys:
    """The keys of `config.train` besides the objectives' own sections (`train_config` adds those)."""

    steps: int = field(1000, min=1)
    log_every: int = field(100, min=1)
    eval_every: int = field(500, min=0)  # 0: evaluate only at the end
    checkpoint_every: int = field(1000, min=1)
    keep_checkpoints: int = field(3, min=1)  # >= 2 leaves a previous step to fall back to if the latest is damaged
    ema_decay: float = field(0.0, min=0, below=1)  # d > 0: keep ema <- d ema + (1 - d) weights, evaluated beside
    grad_accum_steps: int = field(1, min=1)  # k micro-batches per optimizer step: the update of one k-times batch
    nan_rollbacks: int = field(0, min=0)  # K: on a non-finite loss restore the last good checkpoint, skip the
    # batches since, and go on, up to K times (PaLM's remedy); 0: stop at once
    plot_log_x: bool = False  # log-scale step axis in the workdir's curves.png
    label_smoothing: float = field(0.0, min=0, below=1)  # eps: targets (1 - eps) onehot + eps / V
    z_loss: float = field(0.0, min=0)  # c: + c log^2 Z per token (PaLM: 1e-4)
    mtp_weight: float = field(0.3, min=0)  # lambda of the multi-token-prediction loss (model.mtp_depth > 0)
    mtp_weight_late: float = field(0.1, min=0)  # lambda from train.mtp_switch_fraction of the run on
    mtp_switch_fraction: float = field(1.0, min=0, max=1)  # 1: lambda stays train.mtp_weight (DeepSeek-V3: ~0.68)
    lora: LoRAConfig = field(LoRAConfig())  # rank > 0: low-rank adapters of the frozen weights (posttrain/lora.py)
    init_from: str = ""  # a run folder whose newest weights start this run, fresh optimizer (training/warm_start.py)
    monitors: bool = False  # log weight / update / gradient norms per group, attention entropy, residual RMS,
    # activation density (experiments/training/monitors.py) with the train metrics, and plot them in monitors.png
    profile_steps: str = ""  # "A:B": a JAX profiler trace of steps A..B into WORKDIR/profile (training/throughput.py)
    peak_flops: float = field(0.0, min=0)  # per-device peak FLOP/s for the logged MFU; 0: the device kind's known
    # peak (on CPU: a matmul peak measured once)
    evals: HarnessEvalKeys = field(HarnessEvalKeys())  # lm-evaluation-harness tasks every N steps, logged as metrics
    # (experiments/training/harness_evals.py)
    wandb: WandbKeys = field(WandbKeys())  # Weights & Biases beside TensorBoard (experiments/training/wandb_run.py)


def train_config() -> type:
    """`config.train`'s dataclass: TrainKeys, `train.objective` (an entry of experiments.objectives.OBJECTIVES, ""
    for the one whose keys are set) and each objective's own section (`train.distill`, `train.preference`,
    `train.grpo`: the entry's `section` and `keys`), so that an objective declares its keys in its own file."""
    return _train_config(tuple(objectives.OBJECTIVES.items()))


@functools.cache
def _train_config(entries: tuple) -> type:
    own = [(e.section, type(e.keys), field(e.keys)) for _, e in entries if e.section]
    chosen = ("objective", str, field("", choices=("", *(name for name, _ in entries))))
    return dataclasses.make_dataclass("TrainConfig", [chosen, *own], bases=(TrainKeys,), frozen=True)


def sections(model: str, dataset: str) -> dict:
    """Section name -> the dataclass that declares its keys."""
    return {"model": models.MODELS[model][1], "data": data.DATASETS[dataset][1], "train": train_config(),
            "optimizer": optimizers.OptimizerConfig, "mesh": sharding.MeshConfig}


def switch_family(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` with `config.model` rebuilt for the family `name`: its defaults, and the value `config.model` has
    for every key the two families share (the experiment's width and depth, the user's settings) where the new
    family admits it (a `router` of MoE's choices is not one of MoR's); the keys only the old family has are
    dropped. What `--config.model.name=NAME` does on the command line."""
    return _switch_section(config, "model", models.MODELS[name][1])


def switch_dataset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`config` with `config.data` rebuilt for the dataset `name` as `switch_family` rebuilds the model (the
    sequence length and batch sizes carry over). What `--config.data.name=NAME` does on the command line."""
    return _switch_section(config, "data", data.DATASETS[name][1])


def _switch_section(config, section: str, cls) -> ml_collections.ConfigDict:
    fresh = dataclasses.asdict(cls())
    shared = {k: v for k, v in config[section].items()
              if k in fresh and k != "name" and not field_problems(cls, {k: v}, "")}
    with config.unlocked():
        config[section] = ml_collections.ConfigDict({**fresh, **shared})
    return config


def get_config(model: str = "transformer", dataset: str = "algorithmic") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    for name, cls in sections(model, dataset).items():
        config[name] = dataclasses.asdict(cls())
    return config
