"""The Pallas kernels against XLA: attention TFLOP/s (GPU), compiled memory (any backend), SSD time.

    python scripts/benchmarks/bench_kernels.py                      # GPU: the full tables; CPU: the memory table
    python scripts/benchmarks/bench_kernels.py --lengths=1024,4096 --head_dims=128 --tune

Attention (bfloat16, total tokens fixed at --tokens, heads = --hidden / head_dim, as in the
FlashAttention papers): forward and forward+backward TFLOP/s of `kernels_pallas.flash_attention`,
`jax.nn.dot_product_attention` with implementation="cudnn" and "xla", and the plain reference
`models.attention.dot_product_attention`, causal and not, for each length and head dim. FLOPs:
4 B H L^2 D for the forward (halved when causal), 2.5x that for the backward. The ratio column is
flash / cuDNN. `--tune` first times a few (block_q, block_k, num_warps, num_stages) choices at
length 4096, head dim 128 and uses the fastest.

Memory (every backend, compile only): temporary bytes of flash vs reference attention at
--memory_length (8192), forward and forward+backward: O(L) for flash, O(L^2) for the reference.

Masks (GPU): causal flash attention with a sliding window of --window keys and with ALiBi, against plain causal
flash (what skipping the blocks outside the window saves; what the bias costs) and against cuDNN / XLA given the
same window (`local_window_size`) or the same ALiBi bias (a materialised [H, L, L] bias, built inside the timed
call as a model without the kernel would), at head dim 128.

SSD (GPU): `kernels_pallas.ssd_chunked` against `models.ssd.ssd_chunked`, milliseconds.
"""

import functools

from absl import app, flags
import jax
import jax.numpy as jnp

import kernels_pallas
from experiments import studies
from models import attention, positions, ssd

_LENGTHS = flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "Head dims.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Batch x length, fixed across lengths.")
_HIDDEN = flags.DEFINE_integer("hidden", 2048, "Heads x head_dim.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls after a warm-up; the median is kept.")
_TUNE = flags.DEFINE_bool("tune", False, "Time a few block / warp choices at 4096 x 128 first.")
_MEMORY_LENGTH = flags.DEFINE_integer("memory_length", 8192, "Length of the compiled-memory comparison.")
_CAUSAL = flags.DEFINE_list("causal", ["true", "false"], "Masking variants timed.")
_WINDOW = flags.DEFINE_integer("window", 1024, "Keys per query of the sliding-window rows of the mask table.")
_MASKS = flags.DEFINE_bool("masks", True, "Time the sliding-window and ALiBi kernels too (accelerators only).")
_SSD = flags.DEFINE_bool("ssd", True, "Time the SSD kernels too (accelerators only).")


def time_ms(fn, *args):
    """Median milliseconds of jit(fn)(*args) after one warm-up call, or None if it runs out of memory."""
    try:
        return 1e3 * studies.median_seconds(jax.jit(fn).lower(*args).compile(), *args, repeats=_REPEATS.value)
    except Exception as error:  # noqa: BLE001 - out of memory, or an implementation that refuses a shape
        print(f"  ({getattr(fn, '__name__', fn)}: {str(error).splitlines()[0][:120]})")
        return None


def with_backward(fn):
    """Forward + backward: the VJP of fn with a fixed cotangent (all three input gradients)."""

    def run(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    return run


def attention_impls(causal, **flash_kwargs):
    return {
        "flash (Pallas)": functools.partial(kernels_pallas.flash_attention, causal=causal, **flash_kwargs),
        "cuDNN": functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn"),
        "XLA": functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="xla"),
        "reference": functools.partial(attention.dot_product_attention, causal=causal),
    }


def attention_inputs(length, head_dim, dtype=jnp.bfloat16):
    batch, heads = max(1, _TOKENS.value // length), _HIDDEN.value // head_dim
    keys = jax.random.split(jax.random.key(length + head_dim), 4)
    return [jax.random.normal(key, (batch, length, heads, head_dim), dtype) for key in keys]


def attention_flops(length, head_dim, causal):
    batch, heads = max(1, _TOKENS.value // length), _HIDDEN.value // head_dim
    forward = 4 * batch * heads * length * length * head_dim / (2 if causal else 1)
    return forward, 3.5 * forward


def tune():
    """The fastest flash launch choices at 4096 x 128, causal: forward first, then the backward's."""
    q, k, v, d_out = attention_inputs(4096, 128)
    fwd_flops, total_flops = attention_flops(4096, 128, True)
    rate = lambda flops, ms: f"{flops / ms / 1e9:.0f}" if ms else "-"  # noqa: E731
    print("| kernel | block_q | block_k | warps | stages | TFLOP/s |\n|---|---|---|---|---|---|")
    best, best_ms = {}, float("inf")
    for launch in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                   (64, 128, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2)]:
        kwargs = dict(zip(("block_q", "block_k", "num_warps", "num_stages"), launch))
        ms = time_ms(functools.partial(kernels_pallas.flash_attention, causal=True, **kwargs), q, k, v)
        print(f"| forward | {' | '.join(map(str, launch))} | {rate(fwd_flops, ms)} |", flush=True)
        if ms and ms < best_ms:
            best, best_ms = kwargs, ms
    best_total, best_backward = float("inf"), None
    for launch in [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 128, 8, 2),
                   (128, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 3)]:
        fn = functools.partial(kernels_pallas.flash_attention, causal=True, backward_launch=launch, **best)
        ms = time_ms(with_backward(fn), q, k, v, d_out)
        print(f"| forward + backward | {' | '.join(map(str, launch))} | {rate(total_flops, ms)} |", flush=True)
        if ms and ms < best_total:
            best_total, best_backward = ms, launch
    best = dict(best, backward_launch=best_backward)
    print(f"\nfastest: {best}\n")
    return best


def attention_table(flash_kwargs):
    print("| causal | length | head dim | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for causal in [value.lower() == "true" for value in _CAUSAL.value]:
        for head_dim in map(int, _HEAD_DIMS.value):
            for length in map(int, _LENGTHS.value):
                q, k, v, d_out = attention_inputs(length, head_dim)
                fwd_flops, total_flops = attention_flops(length, head_dim, causal)
                rates = {}
                for name, fn in attention_impls(causal, **flash_kwargs).items():
                    fwd = time_ms(fn, q, k, v)
                    total = time_ms(with_backward(fn), q, k, v, d_out)
                    rates[name] = [flops / ms / 1e9 if ms else None for flops, ms in ((fwd_flops, fwd), (total_flops, total))]
                    show = lambda x, f="{:.2f}": f.format(x) if x else "-"  # noqa: E731
                    print(f"| {causal} | {length} | {head_dim} | {name} | {show(fwd)} | {show(rates[name][0], '{:.0f}')} "
                          f"| {show(total)} | {show(rates[name][1], '{:.0f}')} |", flush=True)
                flash, cudnn = rates["flash (Pallas)"], rates["cuDNN"]
                if flash[0] and cudnn[0]:
                    ratios.append((causal, length, head_dim, flash[0] / cudnn[0],
                                   flash[1] / cudnn[1] if flash[1] and cudnn[1] else None))
    print("\n| causal | length | head dim | flash / cuDNN fwd | flash / cuDNN fwd+bwd |\n|---|---|---|---|---|")
    for causal, length, head_dim, fwd, total in ratios:
        print(f"| {causal} | {length} | {head_dim} | {fwd:.2f} | {total:.2f} |" if total else
              f"| {causal} | {length} | {head_dim} | {fwd:.2f} | - |")


def mask_impls(length, heads, window, flash_kwargs):
    """{row name: attention fn(q, k, v)}: causal flash, flash with the window / ALiBi, and cuDNN / XLA given the same."""
    slopes = jnp.asarray(positions.alibi_slopes(heads), jnp.float32)
    distance = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
    bias = lambda: (-slopes[:, None, None] * distance).astype(jnp.bfloat16)[None]  # noqa: E731  [1, H, L, L]
    flash = functools.partial(kernels_pallas.flash_attention, causal=True, **flash_kwargs)
    dense = lambda impl, **kw: functools.partial(jax.nn.dot_product_attention, is_causal=True,  # noqa: E731
                                                 implementation=impl, **kw)
    return {
        "flash, causal": flash,
        f"flash, window {window}": functools.partial(flash, window=window),
        f"cuDNN, window {window}": dense("cudnn", local_window_size=(window - 1, 0)),
        f"XLA, window {window}": dense("xla", local_window_size=(window - 1, 0)),
        "flash, ALiBi": functools.partial(flash, alibi_slopes=slopes),
        "cuDNN, ALiBi bias": lambda q, k, v: dense("cudnn")(q, k, v, bias=bias()),
        "XLA, ALiBi bias": lambda q, k, v: dense("xla")(q, k, v, bias=bias()),
    }


def mask_table(flash_kwargs, head_dim=128):
    """Milliseconds of each mask variant by length, and the ratios that say what the kernels' masks cost or save."""
    window = _WINDOW.value
    print(f"\nMasks: causal, head dim {head_dim}, bfloat16, window {window} keys:\n")
    print("| length | impl | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    summary = []
    for length in map(int, _LENGTHS.value):
        q, k, v, d_out = attention_inputs(length, head_dim)
        ms = {}
        for name, fn in mask_impls(length, q.shape[2], window, flash_kwargs).items():
            ms[name] = (time_ms(fn, q, k, v), time_ms(with_backward(fn), q, k, v, d_out))
            show = lambda t: f"{t:.2f}" if t else "-"  # noqa: E731
            print(f"| {length} | {name} | {show(ms[name][0])} | {show(ms[name][1])} |", flush=True)
        summary.append((length, ms))
    ratio = lambda n, d: f"{n / d:.2f}" if n and d else "-"  # noqa: E731
    print("\nfwd+bwd time ratios (fwd in brackets): window / causal flash, flash / cuDNN with the window, "
          "ALiBi / causal flash, flash / cuDNN with the ALiBi bias")
    print("| length | flash window / causal | window: flash / cuDNN | flash ALiBi / causal | ALiBi: flash / cuDNN |")
    print("|---|---|---|---|---|")
    for length, ms in summary:
        pairs = [(f"flash, window {window}", "flash, causal"), (f"flash, window {window}", f"cuDNN, window {window}"),
                 ("flash, ALiBi", "flash, causal"), ("flash, ALiBi", "cuDNN, ALiBi bias")]
        cells = [f"{ratio(ms[a][1], ms[b][1])} ({ratio(ms[a][0], ms[b][0])})" for a, b in pairs]
        print(f"| {length} | " + " | ".join(cells) + " |")


def memory_table():
    """Compiled temporary memory of flash vs reference attention at half and full --memory_length
    (compile only): flash grows like L, the reference like L^2."""
    lengths = (_MEMORY_LENGTH.value // 2, _MEMORY_LENGTH.value)
    print(f"Compiled temporary memory, causal attention, batch 1, 8 heads of 64, float32 "
          f"(backend {jax.default_backend()}):\n")
    print("| impl | length | fwd MiB | fwd+bwd MiB |\n|---|---|---|---|")
    mib = {}
    for name, fn in (("flash (Pallas)", kernels_pallas.flash_attention), ("reference", attention.dot_product_attention)):
        for length in lengths:
            q, k, v, d_out = (jax.ShapeDtypeStruct((1, length, 8, 64), jnp.float32) for _ in range(4))
            fwd = jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes / 2**20
            total = jax.jit(with_backward(fn)).lower(q, k, v, d_out).compile().memory_analysis().temp_size_in_bytes
            mib[name, length] = (fwd, total / 2**20)
            print(f"| {name} | {length} | {fwd:.1f} | {total / 2**20:.1f} |")
    long = lengths[1]
    for name in ("flash (Pallas)", "reference"):
        growth = [mib[name, long][i] / max(mib[name, lengths[0]][i], 1e-3) for i in (0, 1)]
        print(f"{name}: x{growth[0]:.1f} forward, x{growth[1]:.1f} forward+backward per doubling of the length")
    ratio = [mib["reference", long][i] / max(mib["flash (Pallas)", long][i], 1e-3) for i in (0, 1)]
    print(f"reference / flash at {long}: forward {ratio[0]:.0f}x, forward+backward {ratio[1]:.0f}x")
    return mib


def ssd_table():
    batch, heads, head_dim, state, chunk = 2, 16, 64, 128, 64
    print(f"\nSSD, batch {batch}, {heads} heads of {head_dim}, state {state}, chunk {chunk}, float32:\n")
    print("| length | Pallas fwd ms | XLA fwd ms | Pallas fwd+bwd ms | XLA fwd+bwd ms | XLA / Pallas fwd | XLA / Pallas fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for length in map(int, _LENGTHS.value):
        keys = jax.random.split(jax.random.key(length), 4)
        x = jax.random.normal(keys[0], (batch, length, heads, head_dim))
        a = -jnp.exp(jax.random.normal(keys[1], (batch, length, heads)) - 3.0)
        b, c = (jax.random.normal(key, (batch, length, 1, state)) for key in keys[2:])
        times = []
        for fn in (functools.partial(kernels_pallas.ssd_chunked, chunk_size=chunk),
                   functools.partial(ssd.ssd_chunked, chunk_size=chunk)):
            loss = lambda x, a, b, c, fn=fn: jnp.sum(fn(x, a, b, c)[0] ** 2)  # noqa: E731
            times += [time_ms(lambda *args, fn=fn: fn(*args)[0], x, a, b, c),
                      time_ms(jax.grad(loss, argnums=(0, 1, 2, 3)), x, a, b, c)]
        pallas_fwd, xla_fwd, pallas_total, xla_total = times[0], times[2], times[1], times[3]
        ratio = lambda n, d: f"{n / d:.2f}" if n and d else "-"  # noqa: E731
        show = lambda t: f"{t:.2f}" if t else "-"  # noqa: E731
        print(f"| {length} | {show(pallas_fwd)} | {show(xla_fwd)} | {show(pallas_total)} | {show(xla_total)} "
              f"| {ratio(xla_fwd, pallas_fwd)} | {ratio(xla_total, pallas_total)} |", flush=True)


def main(argv):
    del argv
    print(f"devices: {jax.devices()}  jax {jax.__version__}\n")
    memory_table()
    if jax.default_backend() == "cpu":
        print("\n(no accelerator: the timing tables need a GPU)")
        return
    flash_kwargs = tune() if _TUNE.value else {}
    attention_table(flash_kwargs)
    if _MASKS.value:
        mask_table(flash_kwargs)
    if _SSD.value:
        ssd_table()


if __name__ == "__main__":
    app.run(main)
