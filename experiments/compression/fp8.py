"""Round to nearest in 8-bit floating point, e4m3 (OCP FP8's E4M3, no infinities: 1 sign, 4 exponent bits with bias 7,
3 mantissa bits; the largest finite value 448, the smallest subnormal 2^-9).

Each output channel (or each group of `group_size` consecutive inputs of it) gets one scale that maps its largest
magnitude onto the format's largest value, and every weight is rounded to the nearest e4m3 value (ties to an even
mantissa) by the hardware format's own cast:

    scale = max |v| / 448   (an all-zero channel: 1),    dequantized  scale x e4m3(v / scale)
"""

import jax.numpy as jnp

E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


def check(w_shape, group_size: int) -> None:
    if group_size != -1 and (group_size < 1 or w_shape[0] % group_size):
        raise ValueError(f"group_size={group_size} does not divide the layer's {w_shape[0]} inputs (-1: one group "
                         "per output channel)")


def fp8(w, *, group_size: int = -1, with_grid: bool = False):
    """Weights on their channel's (or group's) scaled e4m3 grid, dequantized: float32 [in, out] (with_grid: and
    {"scale" [groups, out], "group" int32 [in]})."""
    check(w.shape, group_size)
    w = jnp.asarray(w, jnp.float32)
    size = w.shape[0] if group_size == -1 else group_size
    groups = w.reshape(w.shape[0] // size, size, w.shape[1])
    largest = jnp.abs(groups).max(1, keepdims=True)
    scale = jnp.where(largest == 0, 1.0, largest / E4M3_MAX)
    w_hat = (scale * (groups / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32)).reshape(w.shape)
    if not with_grid:
        return w_hat
    return w_hat, {"scale": scale[:, 0], "group": jnp.arange(w.shape[0], dtype=jnp.int32) // size}
