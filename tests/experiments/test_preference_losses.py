"""The preference losses (docs/interfaces.md) against their papers' formulas, written out again in float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import losses


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_loss(kind, pw, pl, rw, rl, beta, eps=0.0, gamma=0.0, nw=None, nl=None, kl=None, ipo_per_token=True):
    """Per-pair losses straight from each paper (pw, pl: policy log pi(y_w), log pi(y_l); rw, rl: reference;
    kl: KTO's mismatched pairs' (policy, reference) log-probabilities)."""
    h = (pw - rw) - (pl - rl)
    if kind == "dpo":  # Rafailov et al. eq. 7; Mitchell's conservative form with eps
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if kind == "ipo":  # Azar et al. eq. 17; TRL's per-token log-ratios by default
        if ipo_per_token:
            h = (pw - rw) / nw - (pl - rl) / nl
        return (h - 1 / (2 * beta)) ** 2
    if kind == "kto":  # Ethayarajh et al. eq. 8 with lambda_D = lambda_U = 1; TRL's z: mismatched pairs' KL, >= 0
        z = max(np.mean(kl[0] - kl[1]), 0.0)
        return ((1 - sigmoid(beta * ((pw - rw) - z))) + (1 - sigmoid(beta * (z - (pl - rl))))) / 2
    if kind == "simpo":  # Meng et al. eq. 6
        return -log_sigmoid(beta / nw * pw - beta / nl * pl - gamma)
    mw, ml = pw / nw, pl / nl  # ORPO, Hong et al. eq. 4-7: the odds of the mean token probability
    ratio = np.log(np.exp(mw) / (1 - np.exp(mw))) - np.log(np.exp(ml) / (1 - np.exp(ml)))
    return -beta * log_sigmoid(ratio)


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    n = 7
    nw, nl = rng.integers(1, 9, n).astype(np.float64), rng.integers(1, 9, n).astype(np.float64)
    pw, pl = -rng.uniform(0.2, 3.0, n) * nw, -rng.uniform(0.2, 3.0, n) * nl
    rw, rl = pw + rng.normal(0, 1, n), pl + rng.normal(0, 1, n)
    return pw, pl, rw, rl, nw, nl


@pytest.fixture(scope="module")
def mismatched_pairs():
    """(policy, reference) log-probabilities of 7 mismatched pairs, with a positive KL estimate (z > 0 binds)."""
    rng = np.random.default_rng(1)
    ref = -rng.uniform(2.0, 9.0, 7)
    return ref + rng.normal(0.4, 0.5, 7), ref


@pytest.mark.parametrize("kind,beta,eps,gamma,per_token", [
    ("dpo", 0.1, 0.0, 0.0, True), ("dpo", 0.5, 0.2, 0.0, True), ("ipo", 0.3, 0.0, 0.0, True),
    ("ipo", 0.3, 0.0, 0.0, False), ("kto", 0.4, 0.0, 0.0, True), ("simpo", 2.0, 0.0, 0.7, True),
    ("orpo", 0.1, 0.0, 0.0, True)])
def test_each_loss_is_its_papers_formula(pairs, mismatched_pairs, kind, beta, eps, gamma, per_token):
    pw, pl, rw, rl, nw, nl = pairs
    kl = dict(kl_logps=jnp.asarray(mismatched_pairs[0]), ref_kl_logps=jnp.asarray(mismatched_pairs[1]))
    lengths = dict(chosen_lengths=jnp.asarray(nw), rejected_lengths=jnp.asarray(nl))
    loss, metrics = losses.preference_loss(*(jnp.asarray(x, jnp.float32) for x in (pw, pl, rw, rl)), kind=kind, beta=beta,
                                           label_smoothing=eps, gamma=gamma, ipo_per_token=per_token, **lengths, **kl)
    expected = numpy_loss(kind, pw, pl, rw, rl, beta, eps, gamma, nw, nl, mismatched_pairs, per_token)
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=2e-5)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0 and np.isfinite(float(metrics["reward_margin"]))
    if kind == "kto":
        z = np.mean(mismatched_pairs[0] - mismatched_pairs[1])
        assert z > 0 and float(metrics["reference_point"]) == pytest.approx(z, rel=1e-5)


def test_kto_gradient_is_the_analytic_one_with_the_reference_point_held(pairs, mismatched_pairs):
    """d/d log pi(y_w) = -w_D beta s'(beta (r_w - z)) / 2n, d/d log pi(y_l) = w_U beta s'(beta (z - r_l)) / 2n, and
    nothing flows into the mismatched pairs (z is a detached estimate)."""
    pw, pl, rw, rl, _, _ = pairs
    beta, w_d, w_u, n = 0.4, 1.5, 0.7, len(pw)

    def loss(w, rejected, kl_policy):
        return losses.preference_loss(w, rejected, jnp.asarray(rw), jnp.asarray(rl), kind="kto", beta=beta,
                                      desirable_weight=w_d, undesirable_weight=w_u, kl_logps=kl_policy,
                                      ref_kl_logps=jnp.asarray(mismatched_pairs[1]))[0]

    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(pw), jnp.asarray(pl), jnp.asarray(mismatched_pairs[0]))
    z = np.mean(mismatched_pairs[0] - mismatched_pairs[1])
    slope = lambda x: sigmoid(x) * (1 - sigmoid(x))  # noqa: E731
    np.testing.assert_allclose(grads[0], -w_d * beta * slope(beta * ((pw - rw) - z)) / (2 * n), rtol=1e-5)
    np.testing.assert_allclose(grads[1], w_u * beta * slope(beta * (z - (pl - rl))) / (2 * n), rtol=1e-5)
    np.testing.assert_array_equal(grads[2], 0.0)


def test_hand_computed_cases():
    zero, one = jnp.zeros(1), jnp.ones(1)
    dpo = lambda *a, **k: float(losses.preference_loss(*a, kind="dpo", beta=0.1, **k)[0])  # noqa: E731
    assert dpo(zero, zero, zero, zero) == pytest.approx(np.log(2))  # a policy equal to its reference
    assert dpo(zero, zero, zero, zero, label_smoothing=0.3) == pytest.approx(np.log(2))
    # h = 10: -log sig(1) = log(1 + e^-1)
    assert dpo(10 * one, zero, zero, zero) == pytest.approx(np.log1p(np.exp(-1.0)), rel=1e-6)
    ipo = losses.preference_loss(5 * one, zero, zero, zero, kind="ipo", beta=0.1)[0]  # h = 1 / (2 beta): the minimum
    assert float(ipo) == pytest.approx(0.0, abs=1e-10)
    lengths = 2 * one
    simpo, metrics = losses.preference_loss(-2 * one, -4 * one, kind="simpo", beta=1.0, gamma=1.0,
                                            chosen_lengths=lengths, rejected_lengths=lengths)
    assert float(simpo) == pytest.approx(np.log(2)) and float(metrics["reward_margin"]) == pytest.approx(1.0)
    # ORPO at P_w = 1/2, P_l = 1/3 per token: log odds 0 and log(1/2); the loss -beta log sig(log 2) = beta log(3/2)
    orpo = losses.preference_loss(jnp.log(0.5) * one, jnp.log(1 / 3) * one, kind="orpo", beta=0.1, chosen_lengths=one,
                                  rejected_lengths=one)[0]
    assert float(orpo) == pytest.approx(0.1 * np.log(1.5), rel=1e-5)


def test_dpo_gradient_equals_finite_differences(pairs):
    pw, pl, rw, rl, _, _ = pairs
    with jax.enable_x64():
        args = tuple(jnp.asarray(x, jnp.float64) for x in (pw, pl, rw, rl))
        loss = lambda w, r: losses.preference_loss(w, r, args[2], args[3], kind="dpo", beta=0.3, label_smoothing=0.1)[0]  # noqa: E731
        grad_w, grad_l = jax.grad(loss, argnums=(0, 1))(args[0], args[1])
        step = 1e-6
        for i in range(len(pw)):
            e = jnp.zeros(len(pw), jnp.float64).at[i].set(step)
            fd_w = (loss(args[0] + e, args[1]) - loss(args[0] - e, args[1])) / (2 * step)
            fd_l = (loss(args[0], args[1] + e) - loss(args[0], args[1] - e)) / (2 * step)
            np.testing.assert_allclose([grad_w[i], grad_l[i]], [fd_w, fd_l], rtol=1e-6, atol=1e-10)


def test_orpo_stays_finite_when_a_response_is_certain():
    """A chosen answer learned to probability 1 (float32 rounds its log-probability to 0) has infinite odds; the
    clamp keeps the loss and its gradient finite (an ORPO run went NaN at step 168 before it)."""
    chosen, rejected = jnp.asarray([0.0, -0.5]), jnp.asarray([-3.0, -2.0])
    lengths = jnp.ones(2)

    def loss(w, r):
        return losses.preference_loss(w, r, kind="orpo", beta=1.0, chosen_lengths=lengths, rejected_lengths=lengths)[0]

    grads = jax.grad(loss, argnums=(0, 1))(chosen, rejected)
    assert np.isfinite(float(loss(chosen, rejected))) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(loss(chosen, rejected), loss(chosen.at[0].set(-1e-6), rejected), rtol=1e-6)


def test_bad_kind_and_missing_inputs_are_one_line_errors():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="'dpo2' is not one of"):
        losses.preference_loss(x, x, x, x, kind="dpo2", beta=0.1)
    with pytest.raises(ValueError, match="needs the reference"):
        losses.preference_loss(x, x, kind="ipo", beta=0.1)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        losses.preference_loss(x, x, kind="simpo", beta=0.1)
    with pytest.raises(ValueError, match="'kto' needs kl_logps and ref_kl_logps"):
        losses.preference_loss(x, x, x, x, kind="kto", beta=0.1)


def test_sequence_logps_sums_the_masked_targets():
    rng = np.random.default_rng(1)
    logits, targets = rng.normal(size=(2, 5, 7)), rng.integers(0, 7, (2, 5))
    mask = (rng.random((2, 5)) < 0.6).astype(np.float32)
    logps, counts = losses.sequence_logps(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    log_softmax = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    expected = np.sum(np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0] * mask, axis=-1)
    np.testing.assert_allclose(logps, expected, rtol=1e-5)
    np.testing.assert_array_equal(counts, mask.sum(-1))
