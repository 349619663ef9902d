"""Deep equilibrium fixed points (Bai et al. 2019): z* = f(z*, *args), solved and differentiated.

Solvers (all `lax.while_loop`, stopping when the residual ||f(z) - z|| / ||f(z)|| <= tol, or
the absolute residual with relative=False, or at max_iter):
- "fixed_point": damped iteration z <- (1 - beta) z + beta f(z).
- "anderson": Anderson acceleration of memory m: with residuals g_i = f(z_i) - z_i of the last m
  iterates, alpha = argmin ||sum_i alpha_i g_i||^2 + lambda s ||alpha||^2 s.t. sum_i alpha_i = 1
  (s: the mean ||g_i||^2, so lambda is relative to the residuals' scale), then
  z <- beta sum_i alpha_i f(z_i) + (1 - beta) sum_i alpha_i z_i.
- "broyden": limited-memory "good" Broyden on g(z) = f(z) - z: z <- z - J^{-1} g with
  J^{-1} = -I + U V^T, updated by J^{-1} += (dz - J^{-1} dg) dz^T J^{-1} / (dz^T J^{-1} dg).

Gradients (`backward=`):
- "implicit": by the implicit function theorem, dL/dargs = u df/dargs at z*, where u solves the
  adjoint fixed point u = dL/dz* + u df/dz (the same solver); memory is constant in the iterations.
- "phantom": k damped steps z <- (1 - lambda) z + lambda f(z, args) from z* (held constant),
  differentiated through (Geng et al. 2021); it approaches the implicit gradient as k grows.
- "unroll": plain differentiation through max_iter damped iterations (the reference; memory linear
  in max_iter).
`fixed_point_with_stats` also returns {"iterations", "residual", "converged"} of the forward solve,
so non-convergence shows in the metrics; with the implicit backward, the cotangent of its optional
`probe` (a zero vector of 2) is (iterations, residual) of the adjoint solve.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

SOLVERS = ("fixed_point", "anderson", "broyden")
BACKWARDS = ("implicit", "phantom", "unroll")


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    solver: str = "anderson"
    tol: float = 1e-5
    max_iter: int = 50
    relative: bool = True  # relative residual ||f(z) - z|| / ||f(z)||, else absolute
    damping: float = 1.0  # beta of the damped fixed-point iteration
    memory: int = 5  # m: Anderson's and Broyden's history
    mixing: float = 1.0  # Anderson's beta
    regularization: float = 1e-4  # Anderson's lambda


def _residual(fz, z, relative):
    error = jnp.linalg.norm(fz - z)
    return error / (jnp.linalg.norm(fz) + 1e-12) if relative else error


def _fixed_point_iteration(g, z0, opt):
    def cond(carry):
        k, _, res = carry
        return (k < opt.max_iter) & (res > opt.tol)

    def body(carry):
        k, z, _ = carry
        fz = g(z)
        res = _residual(fz, z, opt.relative)
        return k + 1, jnp.where(res > opt.tol, (1 - opt.damping) * z + opt.damping * fz, z), res

    k, z, res = jax.lax.while_loop(cond, body, (0, z0, jnp.asarray(jnp.inf, z0.dtype)))
    return z, k, res


def _anderson(g, z0, opt):
    m, n = opt.memory, z0.size
    dtype = z0.dtype

    def cond(carry):
        k, *_, res = carry
        return (k < opt.max_iter) & (res > opt.tol)

    def body(carry):
        k, z, xs, fs, _ = carry
        fz = g(z)
        res = _residual(fz, z, opt.relative)
        slot = k % m
        xs, fs = xs.at[slot].set(z), fs.at[slot].set(fz)
        valid = (jnp.arange(m) <= k).astype(dtype)  # slots filled so far
        residuals = (fs - xs) * valid[:, None]
        gram = residuals @ residuals.T
        # Bordered system [[0, valid^T], [valid, H]] [mu, alpha] = [1, 0]; empty slots get alpha = 0.
        # lambda relative to the residuals' scale, so it neither vanishes early nor dominates late
        scale = jnp.trace(gram) / jnp.sum(valid) + 1e-30
        h = gram + opt.regularization * scale * jnp.eye(m, dtype=dtype) * valid + jnp.diag(1.0 - valid)
        bordered = jnp.block([[jnp.zeros((1, 1), dtype), valid[None]], [valid[:, None], h]])
        rhs = jnp.zeros(m + 1, dtype).at[0].set(1.0)
        alpha = jnp.linalg.solve(bordered, rhs)[1:]
        z_next = opt.mixing * (alpha @ fs) + (1 - opt.mixing) * (alpha @ xs)
        return k + 1, jnp.where(res > opt.tol, z_next, z), xs, fs, res

    init = (0, z0, jnp.zeros((m, n), dtype), jnp.zeros((m, n), dtype), jnp.asarray(jnp.inf, dtype))
    k, z, *_, res = jax.lax.while_loop(cond, body, init)
    return z, k, res


def _broyden(g, z0, opt):
    m, n = opt.memory, z0.size
    dtype = z0.dtype
    root = lambda z: g(z) - z  # noqa: E731

    def inverse_jacobian(us, vs, x):  # (-I + U V^T) x
        return -x + us.T @ (vs @ x)

    def inverse_jacobian_t(us, vs, x):  # (-I + V U^T) x
        return -x + vs.T @ (us @ x)

    def cond(carry):
        k, *_, res = carry
        return (k < opt.max_iter) & (res > opt.tol)

    def body(carry):
        k, z, gz, us, vs, _ = carry
        dz = -inverse_jacobian(us, vs, gz)
        z_next = z + dz
        g_next = root(z_next)
        dg = g_next - gz
        j_dg = inverse_jacobian(us, vs, dg)
        v = inverse_jacobian_t(us, vs, dz)
        denominator = dz @ j_dg
        safe = jnp.abs(denominator) > 1e-30
        u = jnp.where(safe, (dz - j_dg) / jnp.where(safe, denominator, 1.0), 0.0)
        slot = k % m
        us, vs = us.at[slot].set(u), vs.at[slot].set(jnp.where(safe, v, 0.0))
        res = _residual(g_next + z_next, z_next, opt.relative)
        return k + 1, z_next, g_next, us, vs, res

    g0 = root(z0)
    res0 = _residual(g0 + z0, z0, opt.relative)
    init = (0, z0, g0, jnp.zeros((m, n), dtype), jnp.zeros((m, n), dtype), res0)
    k, z, *_, res = jax.lax.while_loop(cond, body, init)
    return z, k, res


_SOLVE = {"fixed_point": _fixed_point_iteration, "anderson": _anderson, "broyden": _broyden}


def solve(g, z0, opt: SolverOptions):
    """z with g(z) = z for g on arrays of z0's shape; returns (z, iterations, final residual)."""
    if opt.solver not in _SOLVE:
        raise ValueError(f"solver={opt.solver!r} is not one of {list(SOLVERS)}")
    flat = lambda z: g(z.reshape(z0.shape)).reshape(-1)  # noqa: E731
    z, k, res = _SOLVE[opt.solver](flat, z0.reshape(-1), opt)
    return z.reshape(z0.shape), k, res


def _stats(k, res, opt):
    return {"iterations": jnp.asarray(k, jnp.float32), "residual": jnp.asarray(res, jnp.float32),
            "converged": (res <= opt.tol).astype(jnp.float32)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _implicit(f, opt, backward_opt, z0, args, probe):
    z, k, res = solve(lambda z: f(z, *args), jax.lax.stop_gradient(z0), opt)
    return z, _stats(k, res, opt)


def _implicit_fwd(f, opt, backward_opt, z0, args, probe):
    z, stats = _implicit(f, opt, backward_opt, z0, args, probe)
    return (z, stats), (z, args, probe)


def _implicit_bwd(f, opt, backward_opt, residuals, cotangents):
    z, args, probe = residuals
    z_bar = cotangents[0]
    _, vjp_z = jax.vjp(lambda z_: f(z_, *args), z)
    # The adjoint fixed point u = z_bar + u df/dz, solved like the forward one.
    u, k, res = solve(lambda u_: vjp_z(u_)[0] + z_bar, z_bar, backward_opt)
    _, vjp_args = jax.vjp(lambda *a: f(z, *a), *args)
    return jnp.zeros_like(z), vjp_args(u), jnp.stack([k, res]).astype(probe.dtype)


_implicit.defvjp(_implicit_fwd, _implicit_bwd)


def fixed_point_with_stats(f, z0, *args, solver="anderson", tol=1e-5, max_iter=50, backward="implicit",
                           backward_solver=None, backward_max_iter=None, phantom_steps=5, phantom_damping=0.5,
                           probe=None, **options):
    """(z*, stats) with f(z*, *args) = z*; see the module docstring for solvers and `backward`."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward={backward!r} is not one of {list(BACKWARDS)}")
    opt = SolverOptions(solver=solver, tol=tol, max_iter=max_iter, **options)
    if backward == "unroll":
        def step(_, z):
            return (1 - opt.damping) * z + opt.damping * f(z, *args)
        z = jax.lax.fori_loop(0, max_iter, step, z0)
        res = _residual(f(z, *args), z, opt.relative)
        return z, _stats(max_iter, res, opt)
    backward_opt = dataclasses.replace(opt, solver=backward_solver or solver,
                                       max_iter=backward_max_iter or max_iter)
    if backward == "implicit":
        return _implicit(f, opt, backward_opt, z0, args, jnp.zeros(2) if probe is None else probe)
    z, k, res = solve(lambda z_: f(z_, *args), jax.lax.stop_gradient(z0), opt)
    z = jax.lax.stop_gradient(z)
    for _ in range(phantom_steps):  # the phantom gradient's k damped steps, differentiated through
        z = (1 - phantom_damping) * z + phantom_damping * f(z, *args)
    return z, _stats(k, res, opt)


def fixed_point(f, z0, *args, solver="anderson", tol=1e-5, max_iter=50, **kwargs):
    """z* with f(z*, *args) == z*, differentiable in args (docs/interfaces.md); implicit gradients by default."""
    return fixed_point_with_stats(f, z0, *args, solver=solver, tol=tol, max_iter=max_iter, **kwargs)[0]
