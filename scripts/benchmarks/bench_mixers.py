"""Time and compiled memory of each token mixer against sequence length: one layer, forward and forward+backward.

    python scripts/benchmarks/bench_mixers.py [--lengths=512,1024,2048,4096,8192,16384] [--window=512]
        [--attention_max_length=8192] [--repeats=3]

Batch 1, d_model 256, float32, each mixer alone as the models build it (no norm, MLP or residual):

    full      causal softmax attention, 4 heads of 64, RoPE (models/gqa.py, attention_impl xla)
    sliding   the same with a sliding window of `--window` keys (attention_pattern sliding: a mask on the full
              score matrix in the XLA path; the Pallas kernels skip the blocks outside the window)
    linear    Katharopoulos et al.'s linear attention, 4 heads of 64, the chunked causal scan (chunk 64)
    mamba1    Mamba-1's selective scan (expand 2, state 16): a parallel prefix over [L, d_inner, N] pairs
    mamba1_seq  the same trained through its recurrence (`mamba1_scan=sequential`: a lax.scan over positions)
    mamba2    Mamba-2 (expand 2, heads of 64, state 64): the chunked SSD

Forward+backward takes the gradient of sum(y^2) with respect to the input and every parameter. Time is the
median of `--repeats` calls after a warm-up; memory is the compiled program's temporary bytes. Prints the table,
each mixer's growth per doubling of the length (2.0: linear, 4.0: quadratic) and its time against full
attention's at each length.
"""

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments import studies
from models import blocks, hybrid, mamba1, mamba2

_LENGTHS = flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_WINDOW = flags.DEFINE_integer("window", 512, "The sliding window's keys per query.")
_ATTENTION_MAX = flags.DEFINE_integer("attention_max_length", 8192, "Longest length timed for full and sliding "
                                      "attention (their [H, L, L] scores and gradients: ~12 GiB at 16k).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after a warm-up; the median is kept.")

MIXERS = ("full", "sliding", "linear", "mamba1", "mamba1_seq", "mamba2")
D_MODEL, HEADS = 256, 4


def mixer_config(length: int, mixer: str) -> hybrid.HybridConfig:
    return hybrid.HybridConfig(
        vocab_size=256, max_len=length, d_model=D_MODEL, num_heads=HEADS, num_layers=1, layer_pattern="A",
        attention_pattern="sliding" if mixer == "sliding" else "causal", attention_window=_WINDOW.value,
        linear_chunk=64, expand=2, ssm_head_dim=64, ssm_state=16 if mixer.startswith("mamba1") else 64,
        mamba1_scan="sequential" if mixer == "mamba1_seq" else "associative_scan")


def mixer_fn(mixer: str, cfg):
    """(module, apply(params, x) -> y [B, L, D])."""
    if mixer in ("full", "sliding", "linear"):
        module = blocks.ATTENTIONS["linear" if mixer == "linear" else "gqa"](cfg)
        return module, lambda params, x: module.apply({"params": params}, x, 0)[0]
    family = mamba1 if mixer.startswith("mamba1") else mamba2
    module = family.Mamba1(cfg) if family is mamba1 else family.Mamba2(cfg)
    return module, lambda params, x: module.apply({"params": params}, x, family.init_state(cfg, x.shape[0]))[0]


def measure(fn, args) -> tuple[float, int]:
    """(median seconds, compiled temporary bytes) of jit(fn)(*args)."""
    compiled = jax.jit(fn).lower(*args).compile()
    return studies.median_seconds(compiled, *args, repeats=_REPEATS.value), compiled.memory_analysis().temp_size_in_bytes


def measure_mixer(mixer: str, length: int) -> tuple:
    """(forward s, forward bytes, forward+backward s, forward+backward bytes) of one layer at `length`."""
    cfg = mixer_config(length, mixer)
    module, apply = mixer_fn(mixer, cfg)
    x = jax.random.normal(jax.random.key(0), (1, length, D_MODEL))
    init_args = (x, 0) if mixer in ("full", "sliding", "linear") else (
        x, (mamba1 if mixer.startswith("mamba1") else mamba2).init_state(cfg, 1))
    params = nn.meta.unbox(module.init(jax.random.key(1), *init_args)["params"])
    loss_and_grads = jax.value_and_grad(lambda p, x: jnp.sum(apply(p, x) ** 2), argnums=(0, 1))
    return (*measure(apply, (params, x)), *measure(loss_and_grads, (params, x)))


def main(argv):
    del argv
    lengths = [int(n) for n in _LENGTHS.value]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; batch 1, d_model {D_MODEL}, float32, "
          f"window {_WINDOW.value}; median of {_REPEATS.value}\n", flush=True)
    rows = {}
    for length in lengths:
        for mixer in MIXERS:
            if mixer in ("full", "sliding") and length > _ATTENTION_MAX.value:
                continue
            rows[(mixer, length)] = measure_mixer(mixer, length)
        print(f"measured length {length}", flush=True)

    print(f"\n{'mixer':10} {'length':>7} {'fwd ms':>9} {'fwd MiB':>9} {'fwd+bwd ms':>11} {'fwd+bwd MiB':>12}")
    for (mixer, length), (f, fm, b, bm) in sorted(rows.items(), key=lambda kv: (MIXERS.index(kv[0][0]), kv[0][1])):
        print(f"{mixer:10} {length:>7} {f * 1e3:>9.2f} {fm / 2**20:>9.1f} {b * 1e3:>11.2f} {bm / 2**20:>12.1f}")

    print("\ngrowth per doubling of the length, forward+backward time (memory):")
    for mixer in MIXERS:
        steps = [f"{n}->{2 * n}: {rows[(mixer, 2 * n)][2] / rows[(mixer, n)][2]:.2f} "
                 f"({rows[(mixer, 2 * n)][3] / max(rows[(mixer, n)][3], 1):.2f})"
                 for n in lengths if (mixer, n) in rows and (mixer, 2 * n) in rows]
        print(f"  {mixer:10} " + ";  ".join(steps))

    print("\nforward+backward time / full attention's at the same length:")
    for mixer in MIXERS[1:]:
        ratios = [f"{n}: {rows[(mixer, n)][2] / rows[('full', n)][2]:.2f}" for n in lengths
                  if (mixer, n) in rows and ("full", n) in rows]
        print(f"  {mixer:10} " + ";  ".join(ratios))


if __name__ == "__main__":
    app.run(main)
