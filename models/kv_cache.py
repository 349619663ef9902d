"""How attention kinds store their decoding caches: as is, or in int8 (`model.kv_cache_dtype = "int8"`).

An int8 entry holds, for each token (and head, where the entry has heads), the vector's absmax scale:

    s = max_i |x_i| / 127          (float32; one per token and head: the entry's shape without its last axis)
    q = round(x / s)  in int8      x ~= q * s,  |x - q s| <= s / 2

so a cached vector of width d costs d + 4 bytes instead of 4 d (float32) or 2 d (bfloat16). Attention
reads the dequantised values; new tokens are quantised as they are written. Kinds call `empty`, `write` and
`read` on each cached array (GQA's keys and values, MLA's latent and rotary key).
"""

import jax
import jax.numpy as jnp

DTYPES = ("float", "int8")  # float: the cache holds the dtype init_cache is given


def quantise(x):
    """x [..., d] -> (int8 [..., d], float32 scale [...])."""
    scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127.0
    q = jnp.round(x / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def dequantise(q, scale, dtype=jnp.float32):
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def empty(shape: tuple[int, ...], dtype, kind: str = "float"):
    """An empty cached array [B, max_len, ...]: an array, or {"int8", "scale"}."""
    if kind == "int8":
        return {"int8": jnp.zeros(shape, jnp.int8), "scale": jnp.zeros(shape[:-1], jnp.float32)}
    return jnp.zeros(shape, dtype)


def write(entry, new, start):
    """`entry` with new [B, T, ...] written at positions start.. along axis 1."""
    if isinstance(entry, dict):
        q, scale = quantise(new)
        return {"int8": jax.lax.dynamic_update_slice_in_dim(entry["int8"], q, start, 1),
                "scale": jax.lax.dynamic_update_slice_in_dim(entry["scale"], scale, start, 1)}
    return jax.lax.dynamic_update_slice_in_dim(entry, new.astype(entry.dtype), start, 1)


def write_ring(entry, new, start):
    """`entry`, a ring of R slots (position p in slot p mod R), with the last min(T, R) of new [B, T, ...] (positions
    start..start+T-1) written to their slots (models/attention_patterns.py)."""
    slots = length(entry)
    kept = min(new.shape[1], slots)
    index = (start + new.shape[1] - kept + jnp.arange(kept)) % slots
    new = new[:, -kept:]
    if isinstance(entry, dict):
        q, scale = quantise(new)
        return {"int8": entry["int8"].at[:, index].set(q), "scale": entry["scale"].at[:, index].set(scale)}
    return entry.at[:, index].set(new.astype(entry.dtype))


def length(entry) -> int:
    """Slots along axis 1."""
    return (entry["int8"] if isinstance(entry, dict) else entry).shape[1]


def read(entry, dtype):
    """The whole cached array in `dtype`."""
    if isinstance(entry, dict):
        return dequantise(entry["int8"], entry["scale"], dtype)
    return entry.astype(dtype)
