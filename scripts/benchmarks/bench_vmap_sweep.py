"""Throughput of vmapped grokking sweeps against running the same members one by one.

    PYTHONPATH=. python scripts/benchmarks/bench_vmap_sweep.py [--config=experiments/configs/default.py] \
        [--members=1,4,16] [--steps=30]

For each member count M: seconds per step of M members trained together by `experiments.studies.vmap_sweep`
(one vmapped, compiled step), against M x the seconds per step of one member alone (the same
function with M = 1), both after a compiling call; prints member-steps per second and the gain.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from data import algorithmic
from experiments.studies import vmap_sweep
from experiments.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "A grokking config.")
_MEMBERS = flags.DEFINE_list("members", ["1", "4", "16"], "Member counts.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per measurement.")


def seconds_per_step(config, members, steps: int) -> float:
    examples = {k: jnp.asarray(v) for k, v in algorithmic.all_examples(config.data.p, config.data.op).items()}
    masks = jnp.asarray(vmap_sweep.train_masks(config.data.p, config.data.op, members))
    states = vmap_sweep.init_states(config, members, examples["inputs"], steps)
    train, _ = vmap_sweep.make_steps(config, steps)
    states, _ = train(states, examples, masks)  # compile
    jax.block_until_ready(states)
    start = time.perf_counter()
    for _ in range(steps):
        states, _ = train(states, examples, masks)
    jax.block_until_ready(states)
    return (time.perf_counter() - start) / steps


def main(argv):
    del argv
    config = trainer.resolve(_CONFIG.value, vmap_sweep._splits_like(_CONFIG.value))
    alone = seconds_per_step(config, vmap_sweep.member_grid(seeds=[0]), _STEPS.value)
    print(f"p = {config.data.p}, {config.data.train_fraction:.0%} train, d_model {config.model.d_model}, "
          f"{config.model.num_layers} layer(s), full batch; {jax.devices()[0].device_kind}\n")
    print("| members | together s/step | one by one s/step | member-steps/s together | one by one | gain |")
    print("|---|---|---|---|---|---|")
    for m in map(int, _MEMBERS.value):
        together = seconds_per_step(config, vmap_sweep.member_grid(seeds=range(m)), _STEPS.value)
        print(f"| {m} | {together:.4f} | {m * alone:.4f} | {m / together:.1f} | {1 / alone:.1f} | "
              f"{m * alone / together:.2f}x |", flush=True)


if __name__ == "__main__":
    app.run(main)
