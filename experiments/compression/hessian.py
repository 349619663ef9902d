"""What GPTQ and SparseGPT need of the calibration inputs' second moment H = X^T X / n: an inverse Hessian's upper
Cholesky factor. Inputs that never fire (H_ii = 0) are dead: H_ii <- 1 and their weights are zeroed. Damping adds
lambda = damp * mean(diag H) to the diagonal; then

    U upper triangular with U^T U = (H + lambda I)^{-1}.

Row i of U, divided by U_ii, is how the error of weight i is spread over the later inputs (the OBS update with
input i and the earlier ones already fixed): w_{i+1:} <- w_{i+1:} - (w_i - q_i) / U_ii * U_{i, i+1:}.
"""

import jax.numpy as jnp
import jax.scipy.linalg


def check(w_shape, hessian_shape, block_size: int, damp: float) -> None:
    if tuple(hessian_shape) != (w_shape[0], w_shape[0]):
        raise ValueError(f"hessian of shape {tuple(hessian_shape)}: the layer has {w_shape[0]} inputs, so "
                         f"[{w_shape[0]}, {w_shape[0]}]")
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: at least 1")
    if damp < 0:
        raise ValueError(f"damp={damp}: a non-negative fraction of the mean Hessian diagonal")


def inverse_cholesky(hessian, damp: float):
    """(U [in, in], dead bool [in]) of the module doc."""
    h = jnp.asarray(hessian, jnp.float32)
    diagonal = jnp.diagonal(h)
    dead = diagonal == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0])
    lower = jnp.linalg.cholesky(h)
    inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0]))
    return jnp.linalg.cholesky(inverse).T, dead
