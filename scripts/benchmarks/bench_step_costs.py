"""What training options cost per step: the trainer's train step of the LM config (experiments/configs/
lm_shakespeare.py: 4 layers, width 128, context 64, batch 12) with the monitors (`train.monitors`) against
without, and under each optimizer against AdamW, every variant compiled first and then timed interleaved
(median of `--repeats` rounds of `--steps` steps each), on the machine's own devices.

    PYTHONPATH=. python scripts/benchmarks/bench_step_costs.py [--repeats=7] [--steps=20]

Targets: monitors < 5% of step time. The optimizers' rows are the per-step cost behind the optimizer study.
"""

import functools
import time

from absl import app, flags
import flax.linen as nn
import jax
import numpy as np

import models
from experiments.optim import optimizers
from experiments.training import train_state, trainer
from experiments.configs import lm_shakespeare

_REPEATS = flags.DEFINE_integer("repeats", 7, "Interleaved timing rounds.")
_STEPS = flags.DEFINE_integer("steps", 20, "Steps per round.")


def variant(config, model, batch, name: str, with_monitors: bool):
    """(jitted donated step, its first state) with optimizer `name`."""
    config = config.copy_and_resolve_references()
    config.optimizer.name = name
    if name == "schedule_free_adamw":
        config.optimizer.schedule = "constant"
    tx = train_state.make_optimizer(config, model, batch["inputs"])
    schedule = optimizers.learning_rate_schedule(config.optimizer, config.train.steps)
    state = jax.jit(lambda r: nn.meta.unbox(train_state.init_state(model, tx, batch["inputs"], r)))(jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(trainer.train_step, schedule=schedule, with_monitors=with_monitors),
                   donate_argnums=0)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return step, state


def main(argv):
    del argv
    config = lm_shakespeare.get_config()
    config.model.update(vocab_size=65, max_len=64)
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    model = models.build(config.model)
    tokens = np.random.default_rng(0).integers(0, 65, size=(batch_size, seq_len + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch_size, seq_len), np.float32)}
    variants = {"adamw": ("adamw", False), "adamw + monitors": ("adamw", True),
                **{name: (name, False) for name in optimizers.OPTIMIZERS if name != "adamw"}}
    compiled = {label: variant(config, model, batch, *args) for label, args in variants.items()}
    seconds = {label: [] for label in compiled}
    for _ in range(_REPEATS.value):
        for label, (step, state) in compiled.items():
            start = time.perf_counter()
            for _ in range(_STEPS.value):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            compiled[label] = (step, state)
            seconds[label].append((time.perf_counter() - start) / _STEPS.value)
    base = np.median(seconds["adamw"])
    print(f"\n| LM train step ({jax.devices()[0].device_kind}, {jax.device_count()} device) | ms | vs AdamW |")
    print("|---|---|---|")
    for label, times in seconds.items():
        print(f"| {label} | {1e3 * np.median(times):.2f} | {np.median(times) / base:.3f} |")


if __name__ == "__main__":
    app.run(main)
