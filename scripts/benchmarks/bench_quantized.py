"""Quantized numerics (models/quantization.py, through qwix) against float: decode tokens/s and a step's cost.

    PYTHONPATH=. python scripts/benchmarks/bench_quantized.py [--batch=8] [--context=256] [--repeats=5]

A 4-layer transformer of width 512 (8 heads of 64, SwiGLU MLP of 1,536, random weights) decodes one token per
sequence per step with its cache filled to `--context`, and takes a training step (forward and backward) on a batch
of `--batch` x `--context` tokens, as float32 and as each `model.quantization`; every variant is compiled first,
then timed interleaved (median of `--repeats`). The quantized numerics are emulated (qwix's quantization-aware
path: values rounded, products in float32), so on this CPU they cost time rather than save it; the row says how
much. Memory of the weights as a deployment would store them is in docs/studies/compression.md.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

import models
from models import quantization

_BATCH = flags.DEFINE_integer("batch", 8, "Sequences decoded together.")
_CONTEXT = flags.DEFINE_integer("context", 256, "Cache length at which decoding is timed; training rows' length.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")
_STEPS = 16  # decode steps per timed call


def model_config(name: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(models.MODELS["transformer"][1]().__dict__))
    config.update(vocab_size=256, max_len=_CONTEXT.value + _STEPS, d_model=512, num_layers=4, num_heads=8,
                  d_mlp=1536, activation="swiglu", positional="rope", quantization=name)
    return config


def timers(name: str, variables):
    """(decode: time of _STEPS cached decode steps, train: time of one value_and_grad step)."""
    model = models.build(model_config(name))
    batch, context = _BATCH.value, _CONTEXT.value
    tokens = jax.random.randint(jax.random.key(1), (batch, context), 0, 256)
    step = jax.jit(lambda v, t, c, s: model.apply(v, t, c, s, method=model.decode))
    _, filled = step(variables, tokens, model.init_cache(batch, context + _STEPS), 0)

    @jax.jit
    def decode(v, cache):
        def one(carry, i):
            token, cache = carry
            logits, cache = model.apply(v, token, cache, context + i, method=model.decode)
            return (jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), cache), None
        (token, _), _ = jax.lax.scan(one, (tokens[:, -1:], cache), jnp.arange(_STEPS))
        return token

    loss = jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({**variables, "params": p}, tokens) ** 2)))

    def time_decode():
        started = time.perf_counter()
        jax.block_until_ready(decode(variables, filled))
        return time.perf_counter() - started

    def time_train():
        started = time.perf_counter()
        jax.block_until_ready(loss(variables["params"]))
        return time.perf_counter() - started

    time_decode(), time_train()  # compile
    return time_decode, time_train


def main(argv):
    del argv
    float_model = models.build(model_config(""))
    variables = nn.meta.unbox(float_model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    names = [n for n in quantization.QUANTIZATIONS]
    clocks = {name: timers(name, variables) for name in names}
    decode = {name: [] for name in names}
    train = {name: [] for name in names}
    for _ in range(_REPEATS.value):
        for name in names:
            decode[name].append(clocks[name][0]())
            train[name].append(clocks[name][1]())
    base_decode, base_train = np.median(decode[""]), np.median(train[""])
    print(f"batch {_BATCH.value}, context {_CONTEXT.value}, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| numerics | decode tokens/s | speed vs float | training step (ms) | time vs float |")
    print("|---|---|---|---|---|")
    for name in names:
        tokens_per_s = _BATCH.value * _STEPS / np.median(decode[name])
        print(f"| {name or 'float32'} | {tokens_per_s:,.0f} | {base_decode / np.median(decode[name]):.2f}x | "
              f"{1000 * np.median(train[name]):.1f} | {np.median(train[name]) / base_train:.2f}x |")


if __name__ == "__main__":
    app.run(main)
