"""Training throughput and model FLOPs utilisation (MFU) of LM-shaped transformers.

    python scripts/benchmarks/bench_train.py [--steps=10] [--configs=small,medium,...]
    python scripts/benchmarks/bench_train.py --configs=long-xla,long-pallas     # on a GPU: flash attention in training

For each config it times the trainer's own jitted train step (AdamW, masked next-token loss) on
random tokens, and divides the model FLOPs per second by a float32 matrix-multiply peak measured
in the same run (the best of square matmuls of several sizes, in the config's compute dtype). "temp MiB" is the compiled step's
temporary memory (activations kept for the backward pass, scratch), which bfloat16 compute and the
remat policies change. Model FLOPs per token are PaLM's
count: 6 * (matmul parameters) + 12 * layers * seq_len * d_model (attention scores and values).
"""

import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import studies
from experiments.optim import optimizers
from experiments.training import train_state, trainer
from experiments.configs import base
from models import transformer

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per config (after one warm-up step).")
_CONFIGS = flags.DEFINE_list("configs", ["small", "medium", "medium-scanned", "medium-bf16", "medium-remat-dots",
                                         "medium-remat-full"], "Configs to time (names of CONFIGS).")

SMALL = dict(d_model=128, num_layers=4, num_heads=4, d_mlp=512, vocab_size=256)
MEDIUM = dict(d_model=512, num_layers=6, num_heads=8, d_mlp=2048, vocab_size=256)
LONG = dict(d_model=1024, num_layers=8, num_heads=8, d_mlp=4096, vocab_size=256, dtype="bfloat16")
CONFIGS = {  # name: (model overrides, batch, seq_len); "scanned": the default nn.scan stack, else unrolled
    "small": (dict(SMALL, scan_unroll=4), 32, 64),
    "medium": (dict(MEDIUM, scan_unroll=6), 16, 256),
    "medium-scanned": (MEDIUM, 16, 256),
    "medium-bf16": (dict(MEDIUM, dtype="bfloat16"), 16, 256),
    "medium-remat-dots": (dict(MEDIUM, remat="dots"), 16, 256),
    "medium-remat-full": (dict(MEDIUM, remat="full"), 16, 256),
    # accelerator-sized: 1,024 wide, heads of 128, bfloat16; attention by XLA or Pallas (at context
    # 4,096 the XLA step asks for 81.6 GiB on an 80 GiB H100: docs/benchmarks.md)
    "long-xla": (dict(LONG, attention_impl="xla"), 8, 2048),
    "long-pallas": (dict(LONG, attention_impl="pallas"), 8, 2048),
    "long-pallas-4k": (dict(LONG, attention_impl="pallas"), 8, 4096),
}


def matmul_peak_flops(dtype) -> tuple[float, int]:
    best = (0.0, 0)
    sizes = (1024, 2048, 3072) if jax.default_backend() == "cpu" else (2048, 4096, 8192)
    for n in sizes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32)).astype(dtype)
        seconds = studies.median_seconds(jax.jit(lambda x: x @ x), a, repeats=5)
        best = max(best, (2 * n**3 / seconds, n))
    return best


def bench(name, steps):
    overrides, batch, seq_len = CONFIGS[name]
    config = base.get_config()
    config.model.update(max_len=seq_len, activation="gelu", **overrides)
    cfg = transformer.TransformerConfig(**config.model.to_dict())
    model = transformer.Transformer(cfg)
    schedule = optimizers.learning_rate_schedule(config.optimizer, 1000)
    tx = optimizers.build(config.optimizer, 1000)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, cfg.vocab_size)
    batch_ = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((batch, seq_len))}
    state = jax.jit(lambda r: nn.meta.unbox(train_state.init_state(model, tx, batch_["inputs"], r)))(jax.random.PRNGKey(0))
    step = jax.jit(lambda s, b: trainer.train_step(s, b, schedule=schedule), donate_argnums=0)
    temp_bytes = step.lower(state, batch_).compile().memory_analysis().temp_size_in_bytes
    state, _ = step(state, batch_)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch_)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    matmul_params = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(state.params)
                        if x.ndim >= 2 and "position" not in jax.tree_util.keystr(path))
    flops_per_token = 6 * matmul_params + 12 * cfg.num_layers * seq_len * cfg.d_model
    tokens_per_s = batch * seq_len / seconds
    return dict(name=name, params=sum(x.size for x in jax.tree.leaves(state.params)), tokens_per_s=tokens_per_s,
                model_flops=tokens_per_s * flops_per_token, temp_mib=temp_bytes / 2**20, step_ms=seconds * 1e3)


def main(argv):
    del argv
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    peaks = {}
    for dtype in sorted({CONFIGS[name][0].get("dtype", "float32") for name in _CONFIGS.value}):
        peaks[dtype], n = matmul_peak_flops(jnp.dtype(dtype))
        print(f"{dtype} matmul peak (best square, n={n}): {peaks[dtype] / 1e9:.1f} GFLOP/s")
    print(f"\n{'config':18} {'params':>10} {'step ms':>9} {'tokens/s':>10} {'model GFLOP/s':>14} {'MFU':>6} {'temp MiB':>9}")
    for name in _CONFIGS.value:
        r = bench(name, _STEPS.value)
        peak = peaks[CONFIGS[name][0].get("dtype", "float32")]
        print(f"{name:18} {r['params']:>10,} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f} "
              f"{r['model_flops'] / 1e9:>14.1f} {r['model_flops'] / peak:>6.1%} {r['temp_mib']:>9.0f}", flush=True)


if __name__ == "__main__":
    app.run(main)
