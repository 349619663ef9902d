"""Decoding caches and speed: MHA, GQA (4:1), MQA and MLA at equal d_model, float and int8 caches.

    PYTHONPATH=. python scripts/bench_decode.py [--contexts=1024,4096] [--batch=8] [--repeats=5]

1. KV-cache bytes per token per layer: the formula beside the bytes of the arrays `init_cache` builds
   (float32 and int8). Model: d_model 1024, 16 heads of 64; GQA 4 kv heads, MQA 1; MLA with DeepSeek-V2's
   ratios (d_c = 4 d_h = 256, d_h^R = d_h / 2 = 32). DeepSeek-V2's anchor: MLA's cache equals GQA's with
   2.25 groups (4.5 d_h numbers per token).
2. Decode tokens/s (batch `--batch`, one new token per sequence per step, the cache filled to each context)
   for MHA, GQA and MLA in the naive (expanded) and the absorbed form, on a 4-layer model of width 512
   (8 heads of 64), every variant compiled first, then timed interleaved (median of `--repeats`).
3. The int8 cache's logit error against the float cache, per kind (random weights, 48 decoded tokens).
"""

import dataclasses
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import mla, transformer

_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096"], "Cache lengths at which decoding is timed.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences decoded together.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")

KINDS = {"MHA": dict(attention="gqa", num_kv_heads=0), "GQA 4:1": dict(attention="gqa", num_kv_heads=-4),
         "MQA": dict(attention="gqa", num_kv_heads=1), "MLA": dict(attention="mla")}


def config(kind: str, d_model: int, heads: int, **extra) -> transformer.TransformerConfig:
    options = dict(KINDS[kind])
    if options.get("num_kv_heads", 0) < 0:
        options["num_kv_heads"] = heads // -options["num_kv_heads"]
    return transformer.TransformerConfig(vocab_size=256, d_model=d_model, num_heads=heads, num_layers=4,
                                         d_mlp=4 * d_model, positional="rope", **{**options, **extra})


def formula_numbers(cfg) -> int:
    """Numbers cached per token per layer."""
    if cfg.attention == "mla":
        return mla.cache_numbers_per_token(cfg)
    return 2 * cfg.kv_heads * cfg.head_size


def formula_int8_bytes(cfg) -> int:
    """int8 codes plus one float32 scale per cached vector (per token and head)."""
    if cfg.attention == "mla":
        return mla.cache_numbers_per_token(cfg) + 2 * 4  # the latent and the rotary key: one scale each
    return 2 * cfg.kv_heads * (cfg.head_size + 4)


def measured_bytes(cfg, dtype=jnp.float32) -> float:
    batch, length = 2, 8
    cache = jax.eval_shape(lambda: transformer.Transformer(cfg).init_cache(batch, length, dtype))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) / (batch * length * cfg.num_layers)


def cache_table() -> list[str]:
    rows = ["| kind | numbers / token / layer | float32 bytes (formula / measured) | int8 bytes (formula / measured) "
            "| vs MHA (float32) |", "|---|---|---|---|---|"]
    mha = 4 * formula_numbers(config("MHA", 1024, 16))
    for kind in KINDS:
        cfg = config(kind, 1024, 16)
        numbers, int8 = formula_numbers(cfg), formula_int8_bytes(cfg)
        rows.append(f"| {kind} | {numbers} | {4 * numbers} / {measured_bytes(cfg):.0f} | {int8} / "
                    f"{measured_bytes(dataclasses.replace(cfg, kv_cache_dtype='int8')):.0f} | {4 * numbers / mha:.3f} |")
    return rows


def decoder(cfg, context: int, batch: int):
    """A jitted one-token decode step and its inputs, with the cache filled to `context` - 1 positions."""
    model = transformer.Transformer(cfg)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, tokens)["params"]))(jax.random.key(0))
    cache = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape).astype(x.dtype),
                         model.init_cache(batch, context))
    step = jax.jit(lambda p, t, c, s: model.apply({"params": p}, t, c, s, method=model.decode), donate_argnums=2)
    return step, params, tokens, cache


def speed_table(contexts: list[int], batch: int, repeats: int) -> list[str]:
    variants = {"MHA": config("MHA", 512, 8), "GQA 4:1": config("GQA 4:1", 512, 8),
                "MLA naive": config("MLA", 512, 8, mla_absorb=False), "MLA absorbed": config("MLA", 512, 8)}
    rows = ["| context | " + " | ".join(f"{k} tokens/s" for k in variants) + " | absorbed / naive | absorbed / GQA |",
            "|---|" + "---|" * (len(variants) + 2)]
    for context in contexts:
        compiled = {}
        for name, cfg in variants.items():
            step, params, tokens, cache = decoder(cfg, context, batch)
            _, cache = step(params, tokens, cache, context - 1)
            compiled[name] = [step, params, tokens, cache]
        seconds = {name: [] for name in variants}
        for _ in range(repeats):
            for name, entry in compiled.items():
                step, params, tokens, cache = entry
                start = time.perf_counter()
                for _ in range(4):
                    logits, cache = step(params, tokens, cache, context - 1)
                jax.block_until_ready(logits)
                seconds[name].append((time.perf_counter() - start) / 4)
                entry[3] = cache
        rate = {name: batch / float(np.median(s)) for name, s in seconds.items()}
        rows.append(f"| {context} | " + " | ".join(f"{rate[n]:.0f}" for n in variants) +
                    f" | {rate['MLA absorbed'] / rate['MLA naive']:.2f}x | {rate['MLA absorbed'] / rate['GQA 4:1']:.2f}x |")
    return rows


def int8_error_table() -> list[str]:
    rows = ["| kind | max abs logit error (int8 vs float cache) | max abs logit | relative |", "|---|---|---|---|"]
    tokens = jax.random.randint(jax.random.key(2), (2, 48), 0, 256)
    for kind in KINDS:
        cfg = config(kind, 256, 8)
        params = nn.meta.unbox(transformer.Transformer(cfg).init(jax.random.key(0), tokens)["params"])
        logits = {}
        for dtype in ("float", "int8"):
            model = transformer.Transformer(dataclasses.replace(cfg, kv_cache_dtype=dtype))
            step = jax.jit(lambda t, c, s, model=model: model.apply({"params": params}, t, c, s, method=model.decode))
            cache, out = model.init_cache(2, 48), []
            for t in range(48):
                step_logits, cache = step(tokens[:, t:t + 1], cache, t)
                out.append(step_logits)
            logits[dtype] = jnp.concatenate(out, 1)
        error, scale = float(jnp.max(jnp.abs(logits["int8"] - logits["float"]))), float(jnp.max(jnp.abs(logits["float"])))
        rows.append(f"| {kind} | {error:.2e} | {scale:.2f} | {error / scale:.2e} |")
    return rows


def main(argv):
    del argv
    print(f"devices: {jax.devices()}")
    print("\n".join(cache_table()), end="\n\n", flush=True)
    print("\n".join(int8_error_table()), end="\n\n", flush=True)
    print("\n".join(speed_table([int(c) for c in _CONTEXTS.value], _BATCH.value, _REPEATS.value)), flush=True)


if __name__ == "__main__":
    app.run(main)
