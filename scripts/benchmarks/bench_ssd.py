"""Time and memory of the SSD algorithms and of attention on this machine, by sequence length.

    python scripts/benchmarks/bench_ssd.py [--lengths=512,1024,2048,4096,8192,16384] [--chunk_sizes=32,64,128,256]

Batch 1, 8 heads, head_dim 64, state 64, one group (the issue's shape), float32. For each length it
times forward and forward+backward (gradients of every input) of `ssd_sequential`,
`ssd_associative_scan`, `ssd_chunked` (each chunk size; the best is reported) and causal
`dot_product_attention` with 8 heads of 64, and reads the compiled temporary memory. It prints the
table, the growth per 4x length, the ratios the issue sets targets on, and the crossover length
where chunked SSD overtakes attention.
"""

import functools

from absl import app, flags
import jax
import jax.numpy as jnp

from experiments import studies
from models import attention, ssd

_LENGTHS = flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_CHUNKS = flags.DEFINE_list("chunk_sizes", ["32", "64", "128", "256"], "Chunk sizes tried for ssd_chunked.")
_SEQUENTIAL_MAX = flags.DEFINE_integer("sequential_max_length", 16384, "Longest length timed for the sequential form.")
_ASSOCIATIVE_MAX = flags.DEFINE_integer("associative_max_length", 8192, "Longest length timed for the associative "
                                       "scan (its [L, P, N] states need ~3.5 GiB at 4096 for the backward pass).")
_ATTENTION_MAX = flags.DEFINE_integer("attention_max_length", 8192, "Longest length timed for attention.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (after a warm-up call); the best is kept.")

BATCH, HEADS, HEAD_DIM, STATE, GROUPS = 1, 8, 64, 64, 1


def inputs(length):
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (BATCH, length, HEADS, HEAD_DIM))
    a = -jnp.exp(jax.random.normal(keys[1], (BATCH, length, HEADS)) - 3.0)
    b = jax.random.normal(keys[2], (BATCH, length, GROUPS, STATE))
    c = jax.random.normal(keys[3], (BATCH, length, GROUPS, STATE))
    return x, a, b, c


def attention_inputs(length):
    keys = jax.random.split(jax.random.key(1), 3)
    return tuple(jax.random.normal(k, (BATCH, length, HEADS, HEAD_DIM)) for k in keys)


def measure(fn, args):
    """(median seconds, temporary bytes) of jit(fn)(*args), forward or forward+backward as fn is."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return studies.median_seconds(compiled, *args, repeats=_REPEATS.value), temp


def main(argv):
    del argv
    lengths = [int(n) for n in _LENGTHS.value]
    chunk_sizes = [int(n) for n in _CHUNKS.value]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; batch {BATCH}, heads {HEADS}, "
          f"head_dim {HEAD_DIM}, state {STATE}, float32; median of {_REPEATS.value}\n")
    rows = {}
    for length in lengths:
        args = inputs(length)
        forms = {}
        if length <= _ASSOCIATIVE_MAX.value:
            forms["associative_scan"] = ssd.ssd_associative_scan
        if length <= _SEQUENTIAL_MAX.value:
            forms["sequential"] = ssd.ssd_sequential
        for chunk in chunk_sizes:
            forms[f"chunked_{chunk}"] = functools.partial(ssd.ssd_chunked, chunk_size=chunk)
        for name, fn in forms.items():
            fwd = lambda *a, fn=fn: fn(*a)[0]  # noqa: E731
            bwd = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a)[0] ** 2), argnums=(0, 1, 2, 3))
            rows[(name, length)] = (*measure(fwd, args), *measure(bwd, args))
        if length <= _ATTENTION_MAX.value:
            qkv = attention_inputs(length)
            fwd = lambda q, k, v: attention.dot_product_attention(q, k, v, causal=True)  # noqa: E731
            bwd = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v) ** 2), argnums=(0, 1, 2))
            rows[("attention", length)] = (*measure(fwd, qkv), *measure(bwd, qkv))
        print(f"measured length {length}", flush=True)

    # The best chunk size by forward+backward time at the longest length measured.
    best_chunk = min(chunk_sizes, key=lambda ch: rows[(f"chunked_{ch}", lengths[-1])][2])
    print(f"\nbest chunk size here (forward+backward at length {lengths[-1]}): {best_chunk}\n")
    print(f"{'algorithm':18} {'length':>7} {'fwd ms':>9} {'fwd MiB':>9} {'fwd+bwd ms':>11} {'fwd+bwd MiB':>12}")
    shown = ["sequential", "associative_scan", *(f"chunked_{c}" for c in chunk_sizes), "attention"]
    for name in shown:
        for length in lengths:
            if (name, length) in rows:
                f, fm, b, bm = rows[(name, length)]
                print(f"{name:18} {length:>7} {f * 1e3:>9.2f} {fm / 2**20:>9.1f} {b * 1e3:>11.2f} {bm / 2**20:>12.1f}")

    chunked = f"chunked_{best_chunk}"
    print("\ngrowth per 4x length (time ratio, forward / forward+backward):")
    for name in ("sequential", "associative_scan", chunked, "attention"):
        ratios = [f"{n}->{4 * n}: {rows[(name, 4 * n)][0] / rows[(name, n)][0]:.2f} / "
                  f"{rows[(name, 4 * n)][2] / rows[(name, n)][2]:.2f}"
                  for n in lengths if (name, n) in rows and (name, 4 * n) in rows]
        print(f"  {name:18} " + ";  ".join(ratios))

    if ("sequential", 4096) in rows:
        seq, chk = rows[("sequential", 4096)], rows[(chunked, 4096)]
        print(f"\nat length 4096: chunked forward+backward is {seq[2] / chk[2]:.1f}x faster than sequential "
              f"(target >= 8x); chunked forward takes {chk[0] / seq[0]:.2f}x sequential's time (target <= 1.5x)")
    crossover = [n for n in lengths if ("attention", n) in rows and rows[(chunked, n)][2] < rows[("attention", n)][2]]
    crossover_fwd = [n for n in lengths if ("attention", n) in rows and rows[(chunked, n)][0] < rows[("attention", n)][0]]
    print(f"chunked SSD overtakes attention from length {crossover[0] if crossover else 'beyond the lengths measured'} "
          f"(forward+backward), {crossover_fwd[0] if crossover_fwd else 'beyond the lengths measured'} (forward)")


if __name__ == "__main__":
    app.run(main)
