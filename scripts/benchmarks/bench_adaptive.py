"""Whether adaptive computation's FLOP savings become wall-clock savings: Mixture-of-Depths, Mixture-of-Recursions and
early exit against the dense transformer of the same blocks, side by side in one run.

    PYTHONPATH=. python scripts/benchmarks/bench_adaptive.py [--lengths=256,1024] [--batch=8] [--repeats=5]

Models: width 256, 8 layers, 4 heads of 64, MLP 1024, byte vocabulary. MoD routes every other block at 12.5%
capacity (top-k in training; the causal predictor when decoding); early exit has an exit after every second block
(trained through all of them; decoding at a max-probability threshold of 0.5). MoR has 4 unique blocks (first, 2
shared recursed up to 3 times, last: at most the dense model's 8 block applications, 6 on average), expert-choice
with recursion-wise caching (training: each recursion gathers its tokens; decoding: the threshold) or token-choice
with recursive KV sharing. Routers are untrained (random: ~half the tokens go on at each expert-choice router).
Columns: training step (forward + backward of the loss) and forward time against the dense model's, the
active-parameter ratio (what the FLOP count predicts for the blocks) and the unique parameters, and decode tokens/s
(batch `--batch` and batch 1, a 16-token prompt, 64 new tokens). Every variant is compiled first, then timed
interleaved (median of `--repeats`).
"""

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import models
from experiments import studies

_LENGTHS = flags.DEFINE_list("lengths", ["256", "1024"], "Sequence lengths of the training step.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")

BASE = dict(vocab_size=256, d_model=256, num_layers=8, num_heads=4, d_mlp=1024, positional="rope")
VARIANTS = {"dense": dict(name="transformer"), "MoD 12.5%": dict(name="mod", capacity=0.125),
            "early exit (k=2)": dict(name="transformer", exit_every=2),
            "MoR 3x, expert": dict(name="mor", num_layers=4, recursions=3),
            "MoR 3x, token, shared KV": dict(name="mor", num_layers=4, recursions=3, router="token", kv_sharing="share")}
DECODE = {"dense": {}, "MoD 12.5%": dict(routing="predictor"), "early exit (k=2)": dict(exit_threshold=0.5),
          "MoR 3x, expert": dict(routing="threshold"), "MoR 3x, token, shared KV": {}}


def model_config(variant: str, length: int, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**BASE, **VARIANTS[variant], "max_len": length, **extra})


def step_functions(variant: str, length: int):
    config = model_config(variant, length)
    model = models.build(config)
    tokens = jax.random.randint(jax.random.key(0), (_BATCH.value, length), 0, 256)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])

    def loss(p, t):  # as the trainer's: every exit's loss, MoD's predictor loss
        logits, written = model.apply({"params": p}, t, mutable=[models.EXITS, "losses"])
        ce = lambda x: optax.softmax_cross_entropy_with_integer_labels(x[:, :-1], t[:, 1:]).mean()  # noqa: E731
        return sum(ce(x) for x in (logits, *written.get(models.EXITS, {}).get("logits", ()))) + sum(
            jnp.sum(x) for x in jax.tree.leaves(written.get("losses", {})))

    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    train = jax.jit(jax.grad(loss))
    active = models.parameter_count(config, length, exclude=models.EMBEDDINGS, active=True)
    unique = models.parameter_count(config, length, exclude=models.EMBEDDINGS)
    return {"forward": (forward, params, tokens), "train": (train, params, tokens)}, active, unique


def decode_rate(variant: str, batch: int) -> float:
    prompt, new = 16, 64
    config = model_config(variant, prompt + new, **DECODE[variant])
    model = models.build(config)
    tokens = jax.random.randint(jax.random.key(2), (batch, prompt), 0, 256)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    step = jax.jit(lambda p, t, c, s: model.apply({"params": p}, t, c, s, method=model.decode))

    def generate():
        logits, cache = step(params, tokens, model.init_cache(batch, prompt + new), jnp.int32(0))
        for position in range(prompt, prompt + new):
            logits, cache = step(params, jnp.argmax(logits[:, -1:], axis=-1), cache, jnp.int32(position))
        return logits

    return batch * new / studies.median_seconds(generate, repeats=_REPEATS.value)  # the warm-up call compiles


def main(argv):
    del argv
    print(f"{jax.devices()[0].device_kind}, batch {_BATCH.value}")
    print("| length | variant | active non-embedding params (x dense) | unique | train step ms (x dense) | "
          "forward ms (x dense) |")
    print("|---|---|---|---|---|---|")
    for length in map(int, _LENGTHS.value):
        built = {v: step_functions(v, length) for v in VARIANTS}
        for fns, *_ in built.values():
            for fn, *args in fns.values():
                studies.seconds(fn, *args)  # compile
        times = {v: {k: [] for k in ("train", "forward")} for v in VARIANTS}
        for _ in range(_REPEATS.value):
            for v, (fns, *_) in built.items():
                for kind, (fn, *args) in fns.items():
                    times[v][kind].append(studies.seconds(fn, *args))
        dense = {k: np.median(t) for k, t in times["dense"].items()}
        for v, (_, active, unique) in built.items():
            train, forward = np.median(times[v]["train"]), np.median(times[v]["forward"])
            print(f"| {length} | {v} | {active:,} ({active / built['dense'][1]:.2f}) | {unique:,} | {1e3 * train:.1f} "
                  f"({train / dense['train']:.2f}) | {1e3 * forward:.1f} ({forward / dense['forward']:.2f}) |")
    print()
    print(f"| variant | decode tokens/s at batch {_BATCH.value} (x dense) | at batch 1 (x dense) |")
    print("|---|---|---|")
    rates = {v: [decode_rate(v, b) for b in (_BATCH.value, 1)] for v in VARIANTS}
    for v, rate in rates.items():
        print(f"| {v} | " + " | ".join(f"{r:,.0f} ({r / d:.2f})" for r, d in zip(rate, rates["dense"])) + " |")


if __name__ == "__main__":
    app.run(main)
