"""Check the compiled Pallas kernels against the plain-JAX references on this machine's backend.

    python scripts/tools/check_kernels.py

The tests run the kernels in interpret mode on CPU; this runs them as compiled for the
accelerator (Triton on GPU, Mosaic on TPU) over awkward shapes and prints the relative errors of
outputs and gradients (max |kernel - reference| / max |reference|), float32 and bfloat16. It exits
non-zero when an error is over the tolerance (float32 2e-3, as the accelerator's reference may use
TF32 matmuls; bfloat16 2e-2).
"""

import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from models import attention, ssd

ATTENTION_SHAPES = [  # batch, len_q, len_k, heads_q, heads_kv, head_dim, causal
    (2, 1000, 1000, 8, 2, 64, True),
    (1, 333, 777, 4, 1, 128, True),
    (1, 777, 333, 4, 4, 128, True),
    (3, 260, 300, 6, 3, 64, False),
    (1, 2048, 2048, 4, 4, 128, True),
]
_KERNELS = flags.DEFINE_list("kernels", ["attention", "ssd"], "Which kernels to check.")
TOLERANCE = {jnp.float32: 2e-3, jnp.bfloat16: 2e-2}


def relative_error(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def check_attention(failures):
    for shape in ATTENTION_SHAPES:
        batch, len_q, len_k, heads_q, heads_kv, head_dim, causal = shape
        for dtype in (jnp.float32, jnp.bfloat16):
            keys = jax.random.split(jax.random.key(len_q), 4)
            q = jax.random.normal(keys[0], (batch, len_q, heads_q, head_dim), dtype)
            k, v = (jax.random.normal(key, (batch, len_k, heads_kv, head_dim), dtype) for key in keys[1:3])
            d_out = jax.random.normal(keys[3], q.shape, dtype)

            def forward_backward(fn):
                return jax.jit(lambda q, k, v: (lambda out, vjp: (out, *vjp(d_out.astype(out.dtype))))(*jax.vjp(fn, q, k, v)))(q, k, v)

            # The reference in float32 whatever the kernel's dtype: the error is the kernel's alone.
            with jax.default_matmul_precision("highest"):  # no TF32 in the reference
                want = forward_backward(lambda q, k, v: attention.dot_product_attention(
                    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=causal))
            got = forward_backward(lambda q, k, v: kernels_pallas.flash_attention(q, k, v, causal=causal))
            errors = [relative_error(g, w) for g, w in zip(got, want)]
            bad = max(errors) > TOLERANCE[dtype]
            print(f"flash_attention {shape} {jnp.dtype(dtype).name}: out {errors[0]:.1e}  dq {errors[1]:.1e}  "
                  f"dk {errors[2]:.1e}  dv {errors[3]:.1e}{'  FAILED' if bad else ''}", flush=True)
            failures.append(bad)


def check_ssd(failures):
    for batch, length, heads, groups, head_dim, state, chunk in [(2, 1000, 8, 1, 64, 128, 64), (1, 333, 6, 3, 32, 64, 32)]:
        keys = jax.random.split(jax.random.key(length), 6)
        x = jax.random.normal(keys[0], (batch, length, heads, head_dim))
        dt = jnp.exp(jax.random.uniform(keys[1], (batch, length, heads), minval=np.log(1e-3), maxval=np.log(0.1)))
        a = -jnp.exp(jax.random.uniform(keys[2], (heads,), maxval=np.log(16.0))) * dt
        b, c = (jax.random.normal(key, (batch, length, groups, state)) for key in keys[3:5])
        initial = jax.random.normal(keys[5], (batch, heads, head_dim, state))

        y_weights = jax.random.normal(keys[0], x.shape)

        def run(fn):
            def loss(x, a, b, c):
                y, final = fn(x, a, b, c, chunk_size=chunk, initial_state=initial)
                return jnp.sum(y * y_weights) + jnp.sum(final * initial), (y, final)

            (_, (y, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(x, a, b, c)
            return (y, final, *grads)

        with jax.default_matmul_precision("highest"):
            want = run(ssd.ssd_chunked)
            got = run(kernels_pallas.ssd_chunked)
        errors = [relative_error(g, w) for g, w in zip(got, want)]
        bad = max(errors) > TOLERANCE[jnp.float32]
        print(f"ssd_chunked {(batch, length, heads, groups, head_dim, state, chunk)}: " +
              "  ".join(f"{n} {e:.1e}" for n, e in zip(("y", "final", "dx", "da", "db", "dc"), errors)) +
              ("  FAILED" if bad else ""), flush=True)
        failures.append(bad)


def main(argv):
    del argv
    print(f"devices: {jax.devices()}  jax {jax.__version__}")
    failures = []
    if "attention" in _KERNELS.value:
        check_attention(failures)
    if "ssd" in _KERNELS.value:
        check_ssd(failures)
    print(f"{sum(failures)} failed of {len(failures)}")
    sys.exit(1 if any(failures) else 0)


if __name__ == "__main__":
    app.run(main)
