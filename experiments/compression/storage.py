"""Quantized kernels stored compactly: their codes with the grids they were rounded on.

A kernel w [in, out] that a quantizer rounded (grid.py, gptq.py, awq.py, fp8.py, each with `with_grid=True`) is
stored as

    codes        integer grids: q in [0, 2^b - 1] as uint8 [in, out], or two to a byte for b <= 4 ([in / 2, out]:
                 input 2k in the low four bits, 2k + 1 in the high; an odd `in` padded by one row of zeros);
                 fp8: the e4m3 values w / scale, float8_e4m3fn [in, out]
    scale, zero  float32 [groups, out]: each group's grid (no zero for fp8)
    group        int32 [in]: input i's group (i // group_size, or the order GPTQ's act_order quantized in)
    input_scale  float32 [in]: AWQ's s* (AWQ only)

    w_hat[i, j] = scale[group_i, j] (q_ij - zero[group_i, j]) / input_scale_i        (fp8: scale[group_i, j] q_ij)

which gives back the quantizer's result to float32 rounding. A stacked kernel [L, (E,) in..., out...] stores each of
these with the stack's leading axes. `save` writes a run's whole parameter tree so (the kernels not quantized as
they are) to RUN/packed with orbax; `load_params` reads it back, dequantized, into the model's parameter shapes.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FOLDER = "packed"


def pack(w_hat, grids: dict, bits: int | None) -> dict:
    """w_hat [in, out] on `grids` (a quantizer's with_grid result; bits None: fp8) -> the stored form (module doc)."""
    w_hat = np.asarray(w_hat, np.float32)
    group = np.asarray(grids["group"])
    scale = np.asarray(grids["scale"], np.float32)
    stored = {"scale": scale, "group": group}
    if bits is None:
        return {**stored, "codes": np.asarray(jnp.asarray(w_hat / scale[group]).astype(jnp.float8_e4m3fn))}
    zero = np.asarray(grids["zero"], np.float32)
    input_scale = np.asarray(grids.get("input_scale", np.ones(len(group))), np.float32)
    q = np.clip(np.round(w_hat * input_scale[:, None] / scale[group]) + zero[group], 0, 2**bits - 1).astype(np.uint8)
    stored.update(zero=zero, codes=_two_per_byte(q) if bits <= 4 else q)
    return {**stored, "input_scale": input_scale} if "input_scale" in grids else stored


def unpack(stored: dict) -> np.ndarray:
    """The stored form of one kernel -> w_hat float32 [in, out]."""
    group = np.asarray(stored["group"])
    scale = np.asarray(stored["scale"], np.float32)[group]
    codes = np.asarray(stored["codes"])
    if "zero" not in stored:
        return scale * codes.astype(np.float32)
    q = _from_two_per_byte(codes, len(group)) if codes.shape[0] < len(group) else codes
    w_hat = scale * (q.astype(np.float32) - np.asarray(stored["zero"], np.float32)[group])
    return w_hat / np.asarray(stored["input_scale"], np.float32)[:, None] if "input_scale" in stored else w_hat


def _two_per_byte(q):
    q = np.concatenate([q, np.zeros((len(q) % 2, q.shape[1]), np.uint8)])
    return q[0::2] | (q[1::2] << 4)


def _from_two_per_byte(codes, rows: int):
    return np.stack([codes & 15, codes >> 4], axis=1).reshape(-1, codes.shape[1])[:rows]


def stack(per_index: dict, lead_shape: tuple) -> dict:
    """{index: stored form} over np.ndindex(lead_shape) -> one stored form whose arrays carry the leading axes."""
    first = per_index[next(iter(per_index))]
    return {key: np.stack([per_index[i][key] for i in np.ndindex(*lead_shape)]).reshape(
        *lead_shape, *np.shape(first[key])) for key in first}


def unstack(stored: dict, kernel_shape: tuple) -> np.ndarray:
    """A stored form with leading axes -> the float32 kernel of `kernel_shape` [lead..., in..., out...]."""
    lead = np.shape(stored["group"])[:-1]
    out = np.empty(kernel_shape, np.float32)
    for index in np.ndindex(*lead):
        w_hat = unpack({key: value[index] for key, value in stored.items()})
        out[index] = w_hat.reshape(kernel_shape[len(lead):])
    return out


def is_stored(node) -> bool:
    return isinstance(node, dict) and "codes" in node and "group" in node


def save(workdir: str, params: dict) -> int:
    """Writes `params` (a stored form in place of each quantized kernel) to workdir/packed; returns its bytes."""
    path = os.path.abspath(os.path.join(workdir, FOLDER))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.tree.map(np.asarray, params, is_leaf=lambda x: x is None))
    checkpointer.wait_until_finished()
    return nbytes(params)


def nbytes(params: dict) -> int:
    """Bytes of the arrays of a parameter tree."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def load_params(workdir: str, abstract_params: dict) -> dict:
    """workdir/packed dequantized: each stored kernel float32 in its shape in `abstract_params` (the model's)."""
    stored = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(workdir, FOLDER)))

    def dequantized(node, like):
        if is_stored(node):
            return unstack(node, like.shape)
        if isinstance(node, dict):
            return {key: dequantized(node[key], like[key]) for key in like}
        return np.asarray(node)

    return dequantized(stored, abstract_params)
