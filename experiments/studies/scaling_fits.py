"""Scaling-law fits: Chinchilla's approaches 2 and 3 (Hoffmann et al. 2022), as refitted by
Besiroglu et al. 2024, with bootstrap confidence intervals.

Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted in the log-sum-exp parameterisation
    log L_hat = LSE(a - alpha log N, b - beta log D, e),    A = e^a, B = e^b, E = e^e,
minimising sum_i Huber_delta(log L_hat_i - log L_i) with delta 1e-3, by L-BFGS from every point of
a grid of starting values (all starts optimised at once, vmapped, in float64, for a fixed 100
steps: on the Chinchilla data 100 reach Besiroglu et al.'s optimum, 50 do not); the best final
objective wins. Screening: every start runs `screen_steps` steps first and only the `keep` best go on to the
full `steps` (from where they stopped), which finds the same optimum on the Chinchilla data at a fifth of the work
(`screen_steps=0`: every start runs every step). Bootstrap: refit on resampled points (as multiplicities) from the best start.

Approach 2: per compute budget C whose lowest loss is not at the smallest or largest size (else
the valley lies outside the sizes tried), a parabola of loss in log N through the `window` sizes nearest
(in log N) the lowest loss (a parabola is only the valley's local shape; over decades it biases the
vertex); its vertex is N_opt(C). Fitting
log N_opt = a log C + const gives N_opt ~ C^a and, with D = C / (6N), D_opt ~ C^(1 - a).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

PARAMETERS = ("a", "b", "e", "alpha", "beta")
# Hoffmann et al.'s grid of initialisations, as Besiroglu et al. use it: 6 x 6 x 5 x 5 x 5 = 4,500 starts
GRID = dict(a=np.arange(0, 30, 5), b=np.arange(0, 30, 5), e=np.arange(-1, 1.5, 0.5),
            alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))


def predicted_log_loss(theta, log_n, log_d):
    a, b, e, alpha, beta = theta
    return jax.nn.logsumexp(jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)]), axis=0)


def huber(residual, delta):
    absolute = jnp.abs(residual)
    return jnp.where(absolute <= delta, 0.5 * residual**2, delta * (absolute - 0.5 * delta))


def objective(theta, log_n, log_d, log_loss, weights, delta):
    return jnp.sum(weights * huber(predicted_log_loss(theta, log_n, log_d) - log_loss, delta))


def _minimise(theta0, log_n, log_d, log_loss, weights, delta, steps):
    """L-BFGS (optax, zoom line search) for a fixed number of steps; returns (theta, objective)."""
    fun = lambda theta: objective(theta, log_n, log_d, log_loss, weights, delta)  # noqa: E731
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(_, carry):
        theta, state = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = solver.update(grad, state, theta, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(theta, updates), state

    theta, _ = jax.lax.fori_loop(0, steps, step, (theta0, solver.init(theta0)))
    value = fun(theta)
    return theta, jnp.where(jnp.isfinite(value), value, jnp.inf)


def _as_result(theta) -> dict:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta}


def fit_approach3(model_size, tokens, loss, *, delta=1e-3, steps=100, grid=None, bootstrap=0, seed=0,
                  screen_steps=20, keep=64) -> dict:
    """Fitted {"E", "A", "B", "alpha", "beta"} (+ "objective", and "intervals": 95% bootstrap ranges)."""
    grid = GRID if grid is None else grid
    starts = np.array(list(itertools.product(*(grid[k] for k in PARAMETERS))), np.float64)
    with jax.enable_x64(True):
        data = [jnp.asarray(np.log(np.asarray(v, np.float64))) for v in (model_size, tokens, loss)]
        ones = jnp.ones_like(data[0])
        fit_all = jax.jit(jax.vmap(_minimise, in_axes=(0, None, None, None, None, None, None)), static_argnums=(6,))
        thetas, remaining = jnp.asarray(starts), steps
        if 0 < screen_steps < steps and keep < len(starts):
            screened, values = fit_all(thetas, *data, ones, delta, screen_steps)
            thetas, remaining = screened[jnp.argsort(values)[:keep]], steps - screen_steps
        thetas, values = fit_all(thetas, *data, ones, delta, remaining)
        best = int(jnp.argmin(values))
        result = {**_as_result(thetas[best]), "objective": float(values[best])}
        if bootstrap:
            rng = np.random.default_rng(seed)
            n = len(loss)
            counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(bootstrap)])
            refit = jax.jit(jax.vmap(_minimise, in_axes=(None, None, None, None, 0, None, None)), static_argnums=(6,))
            boot, _ = refit(thetas[best], *data, jnp.asarray(counts, jnp.float64), delta, steps)
            samples = [_as_result(t) for t in np.asarray(boot)]
            result["intervals"] = {k: [float(np.percentile([s[k] for s in samples], q)) for q in (2.5, 97.5)]
                                   for k in ("E", "A", "B", "alpha", "beta")}
    return result


def fit_approach2(model_size, flops, loss, window: int = 7) -> dict:
    """Exponents of N_opt ~ C^a and D_opt ~ C^b (b = 1 - a) from IsoFLOP parabolas, and the vertices."""
    model_size, flops, loss = (np.asarray(v, np.float64) for v in (model_size, flops, loss))
    budgets, optima = [], []
    for budget in np.unique(flops):
        on_curve = np.flatnonzero(flops == budget)
        if len(on_curve) < 3:
            continue
        on_curve = on_curve[np.argsort(model_size[on_curve])]
        best = int(np.argmin(loss[on_curve]))
        if best in (0, len(on_curve) - 1):  # the lowest loss at an end: the valley is outside the sizes tried
            continue
        low = min(max(best - window // 2, 0), max(len(on_curve) - window, 0))
        on_curve = on_curve[low:low + window]
        c2, c1, _ = np.polyfit(np.log(model_size[on_curve]), loss[on_curve], 2)
        if c2 <= 0:  # no minimum inside: the curve is not an IsoFLOP valley
            continue
        budgets.append(budget)
        optima.append(np.exp(-c1 / (2 * c2)))
    if len(budgets) < 2:
        raise ValueError(f"approach 2 needs >= 2 budgets with >= 3 sizes and an interior minimum; got {len(budgets)}")
    a, log_k = np.polyfit(np.log(budgets), np.log(optima), 1)
    return {"n_opt_exponent": float(a), "d_opt_exponent": float(1 - a), "budgets": [float(b) for b in budgets],
            "n_opt": [float(n) for n in optima], "n_opt_coefficient": float(np.exp(log_k))}
