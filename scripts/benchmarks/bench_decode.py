"""Decoding caches and speed: MHA, GQA (4:1), MQA and MLA at equal d_model, float and int8 caches.

    PYTHONPATH=. python scripts/benchmarks/bench_decode.py [--contexts=1024,4096] [--batch=8] [--repeats=5] \
        [--study=runs/attention_study]

1. KV-cache bytes per token per layer: the formula beside the bytes of the arrays `init_cache` builds
   (float32 and int8). Model: d_model 1024, 16 heads of 64; GQA 4 kv heads, MQA 1; MLA with DeepSeek-V2's
   ratios (d_c = 4 d_h = 256, d_h^R = d_h / 2 = 32). DeepSeek-V2's anchor: MLA's cache equals GQA's with
   2.25 groups (4.5 d_h numbers per token).
2. Decode tokens/s (batch `--batch`, one new token per sequence per step, the cache filled to each context)
   for MHA, GQA and MLA in the naive (expanded) and the absorbed form, on a 4-layer model of width 512
   (8 heads of 64), every variant compiled first, then timed interleaved (median of `--repeats`).
3. The int8 cache's logit error against the float cache, per kind (random weights, 48 decoded tokens).
4. Speculative decoding with the trained runs of scripts/studies/attention_study.py (when `--study` holds them): the
   4-layer MHA LM drafted by the 2-layer `draft_seed0` (4 drafts per pass), and the MHA+MTP LM drafting with its
   own MTP module (self-speculation), greedy, on 8 validation prompts of 16 bytes continued by 48: acceptance
   rate, target passes per token, and tokens/s against plain greedy decoding run the same way (one jitted
   decode call per pass; batch 1). DeepSeek-V3's anchor: 85-90% acceptance of the second token, 1.8x tokens/s.
"""

import dataclasses
import os
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import data as datasets
from experiments import restore
from models import mla, speculative, transformer

_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096"], "Cache lengths at which decoding is timed.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences decoded together.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Interleaved timing rounds.")
_STUDY = flags.DEFINE_string("study", "runs/attention_study", "scripts/studies/attention_study.py's workdir (trained runs).")

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


def plain_greedy(model, variables, prompt, num_tokens: int):
    """Greedy decoding with one jitted decode call per token (the speculative loops' own dispatch)."""
    decode = speculative.compiled_method(model, variables, "decode")  # compiled once, like the loops beside it
    cache = model.init_cache(1, prompt.shape[1] + num_tokens)
    logits, cache = decode(prompt, cache, 0)
    tokens = [int(jnp.argmax(logits[0, -1]))]
    for i in range(num_tokens - 1):
        logits, cache = decode(jnp.asarray([[tokens[-1]]], jnp.int32), cache, prompt.shape[1] + i)
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return jnp.asarray([tokens], jnp.int32), None


def speculative_table(study: str) -> list[str]:
    runs = {name: os.path.join(study, name) for name in ("MHA_seed0", "MHA+MTP_seed0", "draft_seed0")}
    missing = [p for p in runs.values() if not os.path.isfile(os.path.join(p, "config.json"))]
    if missing:
        return [f"(speculative decoding skipped: no trained runs {missing}; run scripts/studies/attention_study.py first)"]
    loaded = {name: restore.load_variables(restore.load_config(path), path) for name, path in runs.items()}
    config = restore.load_config(runs["MHA_seed0"])
    prompts = np.asarray(datasets.load(config.data, seed=0).evals["eval"]["inputs"])[:8, :16]
    target, draft, mtp_model = loaded["MHA_seed0"], loaded["draft_seed0"], loaded["MHA+MTP_seed0"]
    methods = {
        "plain greedy (MHA)": lambda p: plain_greedy(*target, p, 48),
        "draft model, 4 drafts/pass": lambda p: speculative.generate_with_draft_model(*target, *draft, p, 48, lookahead=4),
        "plain greedy (MHA+MTP)": lambda p: plain_greedy(*mtp_model, p, 48),
        "MTP self-speculation": lambda p: speculative.generate_with_mtp(*mtp_model, p, 48),
    }
    rows = ["| decoding | acceptance | target passes / token | tokens/s | vs its plain greedy |", "|---|---|---|---|---|"]
    rates = {}
    for name, run in methods.items():
        run(jnp.asarray(prompts[:1]))  # compile
        start, drafted, accepted, passes = time.perf_counter(), 0, 0, 0
        for prompt in prompts:
            _, stats = run(jnp.asarray(prompt[None]))
            if stats is not None:
                drafted, accepted, passes = drafted + stats.drafted, accepted + stats.accepted, passes + stats.target_passes
        rates[name] = 48 * len(prompts) / (time.perf_counter() - start)
        baseline = rates["plain greedy (MHA)" if "MTP" not in name else "plain greedy (MHA+MTP)"]
        accept = f"{accepted / drafted:.3f}" if drafted else "-"
        per_token = f"{passes / (48 * len(prompts)):.3f}" if drafted else "1.000"
        rows.append(f"| {name} | {accept} | {per_token} | {rates[name]:.0f} | {rates[name] / baseline:.2f}x |")
    return rows


def main(argv):
    del argv
    print(f"devices: {jax.devices()}")
    print("\n".join(cache_table()), end="\n\n", flush=True)
    print("\n".join(int8_error_table()), end="\n\n", flush=True)
    print("\n".join(speed_table([int(c) for c in _CONTEXTS.value], _BATCH.value, _REPEATS.value)), end="\n\n", flush=True)
    print("\n".join(speculative_table(_STUDY.value)), flush=True)


if __name__ == "__main__":
    app.run(main)
