"""The layer-level compression functions (experiments/compression) against float64 NumPy transcriptions of the
published algorithms, written in the references' own layout (weights [out, in], loops over columns and blocks as the
papers' code runs them), on random layers whose calibration inputs are correlated and have a dead feature: the
reconstruction error ||X W - X W_hat||^2 equals the reference's, and GPTQ / AWQ / SparseGPT beat RTN / magnitude on
it. fp8 against e4m3's values enumerated from its bit layout."""

import numpy as np
import pytest

from experiments import compression


def reference_grid(x, bits, symmetric):
    """GPTQ's reference quantizer: per row of x [rows, k]."""
    q_max = 2**bits - 1
    lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
    if symmetric:
        hi = np.maximum(np.abs(lo), hi)
        lo = np.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = np.where(empty, -1, lo), np.where(empty, 1, hi)
    scale = (hi - lo) / q_max
    zero = np.full_like(scale, (q_max + 1) / 2) if symmetric else np.round(-lo / scale)
    return scale, zero


def reference_quantize(x, scale, zero, bits):
    return scale * (np.clip(np.round(x / scale) + zero, 0, 2**bits - 1) - zero)


def reference_inverse_factor(h, damp):
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead


def reference_gptq(w_t, h, bits, group_size, act_order, damp, block_size, symmetric):
    """w_t [out, in]: the reference's fasterquant."""
    w = w_t.copy()
    scale, zero = reference_grid(w, bits, symmetric)
    dead = np.diag(h) == 0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(w.shape[1])
    w, h = w[:, perm], h[perm][:, perm]
    hinv, _ = reference_inverse_factor(h, damp)
    w[:, dead[perm]] = 0
    q = np.zeros_like(w)
    for i1 in range(0, w.shape[1], block_size):
        i2 = min(i1 + block_size, w.shape[1])
        w1, err1 = w[:, i1:i2].copy(), np.zeros((w.shape[0], i2 - i1))
        for i in range(i2 - i1):
            if group_size != -1 and (i1 + i) % group_size == 0:
                scale, zero = reference_grid(w[:, i1 + i:i1 + i + group_size], bits, symmetric)
            q[:, i1 + i] = reference_quantize(w1[:, i], scale, zero, bits)
            err1[:, i] = (w1[:, i] - q[:, i1 + i]) / hinv[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(err1[:, i], hinv[i1 + i, i1 + i:i2])
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, np.argsort(perm)]


def reference_sparsegpt(w_t, h, sparsity, n_m, damp, block_size, bits=None):
    """w_t [out, in]: the reference's fasterprune, pruning exactly floor(sparsity x size) of a block; with `bits`, its
    quantizer (the per-row grid of the weights as given) rounds every column after the mask."""
    w = w_t.copy()
    grid = None if bits is None else reference_grid(w, bits, False)  # scale, zero [out]
    hinv, dead = reference_inverse_factor(h, damp)
    w[:, dead] = 0
    for i1 in range(0, w.shape[1], block_size):
        i2 = min(i1 + block_size, w.shape[1])
        w1, err1 = w[:, i1:i2].copy(), np.zeros((w.shape[0], i2 - i1))
        d = np.diag(hinv)[i1:i2]
        if n_m is None:
            saliency = w1**2 / d[None] ** 2
            mask = np.zeros(saliency.size, bool)
            mask[np.argsort(saliency.reshape(-1), kind="stable")[:int(saliency.size * sparsity)]] = True
            mask = mask.reshape(saliency.shape)
        else:
            mask = np.zeros(w1.shape, bool)
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                saliency = w1[:, i:i + n_m[1]] ** 2 / d[None, i:i + n_m[1]] ** 2
                for row in range(w.shape[0]):
                    mask[row, i + np.argsort(saliency[row], kind="stable")[:n_m[0]]] = True
            q = np.where(mask[:, i], 0.0, w1[:, i])
            if bits is not None:
                q = reference_quantize(q, *grid, bits)
            err1[:, i] = (w1[:, i] - q) / hinv[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(err1[:, i], hinv[i1 + i, i1 + i:i2])
            w[:, i1 + i] = q
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def reference_rtn(w_t, bits, group_size, symmetric=False):
    """w_t [out, in] on the reference grid of each row (or each group of `group_size` columns of it)."""
    size = w_t.shape[1] if group_size == -1 else group_size
    parts = []
    for i in range(0, w_t.shape[1], size):
        scale, zero = reference_grid(w_t[:, i:i + size], bits, symmetric)
        parts.append(reference_quantize(w_t[:, i:i + size], scale[:, None], zero[:, None], bits))
    return np.concatenate(parts, axis=1)


def reference_awq(w_t, x, bits, group_size, grid_points=20):
    """w_t [out, in]: AWQ's scale search (llm-awq's _search_module_scale) on one linear layer, the error measured on
    its output over the calibration inputs x [n, in]; (best ratio, scales)."""
    x_mean_abs = np.abs(x).mean(0)
    out = x @ w_t.T
    best = (np.inf, None, None)
    for ratio in np.arange(grid_points) / grid_points:
        s = np.maximum(x_mean_abs**ratio, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        w_hat = reference_rtn(w_t * s[None], bits, group_size) / s[None]
        error = np.mean((out - x @ w_hat.T) ** 2)
        if error < best[0]:
            best = (error, ratio, s)
    return best[1], best[2]


def reference_e4m3(v):
    """v rounded to the nearest finite e4m3 value (ties to an even mantissa), its values enumerated from the bit
    layout: exponent e (bias 7), mantissa m; e = 0 subnormal m/8 2^-6; e = 15, m = 7 is NaN."""
    codes = [(e, m) for e in range(16) for m in range(8) if (e, m) != (15, 7)]
    values = np.array([m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7) for e, m in codes])
    magnitude = np.abs(v)
    upper = np.clip(np.searchsorted(values, magnitude), 1, len(values) - 1)
    below, above = values[upper - 1], values[upper]
    take_above = (above - magnitude < magnitude - below) | ((above - magnitude == magnitude - below) & (upper % 2 == 0))
    return np.sign(v) * np.where(take_above, above, below)


@pytest.fixture(scope="module")
def layer():
    """w [in=96, out=40] and correlated calibration inputs X [400, 96] with input 5 dead (always 0)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 24)) @ rng.normal(size=(24, 96)) + 0.3 * rng.normal(size=(400, 96))
    x *= rng.uniform(0.2, 3.0, size=96)
    x[:, 5] = 0
    w = rng.normal(size=(96, 40)) * rng.uniform(0.5, 2.0, size=40)
    return w, x, x.T @ x / len(x)


def reconstruction_error(x, w, w_hat):
    return float(np.sum((x @ w - x @ np.asarray(w_hat, np.float64)) ** 2))


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, -1, False), (3, 32, False), (8, 16, True)])
def test_rtn_is_the_reference_grid_per_channel_and_per_group(layer, bits, group_size, symmetric):
    w = layer[0]
    found = np.asarray(compression.rtn(w, bits=bits, group_size=group_size, symmetric=symmetric))
    size = w.shape[0] if group_size == -1 else group_size
    groups = [w[i:i + size].T for i in range(0, w.shape[0], size)]  # [out, size] each
    grids = [[p[:, None] for p in reference_grid(g, bits, symmetric)] for g in groups]
    expected = np.concatenate([reference_quantize(g, *grid, bits).T for g, grid in zip(groups, grids)])
    step = np.concatenate([np.broadcast_to(grid[0], g.shape).T for g, grid in zip(groups, grids)])
    same = np.isclose(found, expected, atol=1e-5)
    assert same.mean() > 0.95  # the rest are ties (a symmetric grid's top, v / scale = q_max / 2) rounded in float32
    assert np.all(np.abs(found - expected)[~same] <= step[~same] * 1.001)  # the neighbouring grid point
    assert all(len(np.unique(found[:size, j])) <= 2**bits for j in range(w.shape[1]))


@pytest.mark.parametrize("bits,group_size,act_order,block_size", [(4, -1, False, 32), (3, 32, True, 64),
                                                                  (4, 16, False, 24)])
def test_gptq_matches_the_reference_and_beats_round_to_nearest(layer, bits, group_size, act_order, block_size):
    w, x, h = layer
    found = compression.gptq(w, h, bits=bits, group_size=group_size, act_order=act_order, block_size=block_size)
    expected = reference_gptq(w.T, h, bits, group_size, act_order, 0.01, block_size, False).T
    error, reference_error = reconstruction_error(x, w, found), reconstruction_error(x, w, expected)
    assert error == pytest.approx(reference_error, rel=2e-3)
    assert np.mean(np.isclose(np.asarray(found), expected, atol=1e-3)) > 0.98
    assert np.all(np.asarray(found)[5] == 0)  # the dead input's weights
    assert error < 0.8 * reconstruction_error(x, w, compression.rtn(w, bits=bits, group_size=group_size))


@pytest.mark.parametrize("sparsity,n_m", [(0.5, None), (0.7, None), (None, (2, 4))])
def test_sparsegpt_matches_the_reference_and_beats_magnitude_and_wanda(layer, sparsity, n_m):
    w, x, h = layer
    args = {"sparsity": sparsity} if n_m is None else {"n_m": n_m}
    found = np.asarray(compression.sparsegpt(w, h, block_size=32, **args))
    expected = reference_sparsegpt(w.T, h, sparsity, n_m, 0.01, 32).T
    error = reconstruction_error(x, w, found)
    assert error == pytest.approx(reconstruction_error(x, w, expected), rel=2e-3)
    assert np.mean((found == 0) == (expected == 0)) > 0.99
    if n_m is None:  # exactly the fraction, in every block
        assert all(np.sum(found[i:i + 32] == 0) == int(32 * 40 * sparsity) for i in (0, 32))
    else:
        assert np.all(np.sum(found.reshape(24, 4, 40) == 0, axis=1) >= 2)
    magnitude = compression.wanda(w, np.ones(96), **args)
    wanda = compression.wanda(w, np.mean(x**2, 0), **args)
    assert error < reconstruction_error(x, w, wanda) < reconstruction_error(x, w, magnitude)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_joint_mode_matches_the_reference_and_beats_pruning_then_rounding(layer, n_m):
    """SparseGPT with its quantizer (4 bits per channel): the reference's result, half the weights zero, the rest on
    each channel's grid, and a lower error than rounding SparseGPT's pruned weights afterwards."""
    w, x, h = layer
    args = {"sparsity": 0.5} if n_m is None else {"n_m": n_m}
    found, grids = compression.sparsegpt(w, h, block_size=32, bits=4, with_grid=True, **args)
    found = np.asarray(found)
    expected = reference_sparsegpt(w.T, h, 0.5, n_m, 0.01, 32, bits=4).T
    error = reconstruction_error(x, w, found)
    assert error == pytest.approx(reconstruction_error(x, w, expected), rel=2e-3)
    assert np.mean(np.isclose(found, expected, atol=1e-4)) > 0.98 and np.mean(found == 0) >= 0.5
    scale, zero = np.asarray(grids["scale"])[0], np.asarray(grids["zero"])[0]
    codes = found / scale + zero
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # every weight on its channel's grid
    pruned = np.asarray(compression.sparsegpt(w, h, block_size=32, **args))
    rounded_after = np.where(pruned == 0, 0.0, np.asarray(compression.rtn(pruned, bits=4)))
    assert error < reconstruction_error(x, w, rounded_after)


@pytest.mark.parametrize("bits,group_size", [(3, -1), (4, 32)])
def test_awq_finds_the_references_scales_and_beats_round_to_nearest(layer, bits, group_size):
    w, x, h = layer
    alpha, scales, errors = compression.awq_search(w, h, np.abs(x).mean(0), bits=bits, group_size=group_size)
    reference_alpha, reference_scales = reference_awq(w.T, x, bits, group_size)
    assert errors.shape == (20,) and alpha == pytest.approx(reference_alpha)
    np.testing.assert_allclose(scales, reference_scales, rtol=1e-4)
    found = compression.awq(w, h, np.abs(x).mean(0), bits=bits, group_size=group_size)
    expected = (reference_rtn(w.T * reference_scales[None], bits, group_size) / reference_scales[None]).T
    assert reconstruction_error(x, w, found) == pytest.approx(reconstruction_error(x, w, expected), rel=1e-3)
    rtn_error = reconstruction_error(x, w, compression.rtn(w, bits=bits, group_size=group_size))
    assert alpha > 0 and reconstruction_error(x, w, found) < 0.9 * rtn_error  # alpha = 0 would be RTN itself
    then_gptq = compression.awq(w, h, np.abs(x).mean(0), bits=bits, group_size=group_size, then="gptq",
                                block_size=32)
    s = reference_scales
    expected = reference_gptq(w.T * s[None], h / np.outer(s, s), bits, group_size, False, 0.01, 32, False).T / s[:, None]
    assert reconstruction_error(x, w, then_gptq) == pytest.approx(reconstruction_error(x, w, expected), rel=2e-3)
    assert reconstruction_error(x, w, then_gptq) < reconstruction_error(x, w, found)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_fp8_rounds_to_the_nearest_e4m3_value_of_each_channels_scale(layer, group_size):
    w = layer[0] * np.geomspace(1e-3, 10, 96)[:, None]  # magnitudes across the format's subnormals and normals
    found = np.asarray(compression.fp8(w, group_size=group_size))
    size = 96 if group_size == -1 else group_size
    groups = w.reshape(96 // size, size, 40)
    scale = np.abs(groups).max(1, keepdims=True) / 448
    expected = (scale * reference_e4m3(groups / scale)).reshape(w.shape)
    same = np.isclose(found, expected, rtol=1e-6, atol=0)
    assert same.mean() > 0.99  # the rest: v / scale within float32 rounding of a tie
    assert np.all(np.abs(found - expected)[~same] <= np.abs(expected[~same]) / 8 + 1e-12)  # a neighbouring value


def test_wanda_zeroes_the_lowest_scores_within_each_output(layer):
    w, x, _ = layer
    norms = np.mean(x**2, 0)
    found = np.asarray(compression.wanda(w, norms, sparsity=0.6))
    score = np.abs(w) * np.sqrt(norms)[:, None]
    for j in range(w.shape[1]):
        zeroed = np.argsort(score[:, j], kind="stable")[:int(96 * 0.6)]
        assert set(np.flatnonzero(found[:, j] == 0)) == set(zeroed)
        kept = np.setdiff1d(np.arange(96), zeroed)
        np.testing.assert_allclose(found[kept, j], w[kept, j], rtol=1e-6)
    two_four = np.asarray(compression.wanda(w, norms, n_m=(2, 4))).reshape(24, 4, 40)
    assert np.all(np.sum(two_four == 0, axis=1) == 2)


@pytest.mark.parametrize("call,message", [
    (lambda w, h: compression.rtn(w, bits=1), "bits=1: integer grids of 2 to 8 bits"),
    (lambda w, h: compression.gptq(w, h, bits=4, group_size=10), "group_size=10 does not divide the layer's 96"),
    (lambda w, h: compression.gptq(w, h[:5, :5], bits=4), "hessian of shape (5, 5): the layer has 96 inputs"),
    (lambda w, h: compression.sparsegpt(w, h, n_m=(4, 4)), "n_m=(4, 4): n zeros in every m inputs needs 0 < n < m"),
    (lambda w, h: compression.sparsegpt(w, h, n_m=(2, 5)), "m=5 must divide the layer's 96 inputs"),
    (lambda w, h: compression.wanda(w, np.ones(3)), "input_sq_norms of shape (3,): one per input, (96,)"),
    (lambda w, h: compression.wanda(w, np.ones(96), sparsity=1.0), "sparsity=1.0: a fraction in [0, 1)"),
    (lambda w, h: compression.awq(w, h, np.ones(95), bits=4), "input_mean_abs of shape (95,): one per input, (96,)"),
    (lambda w, h: compression.awq(w, h, np.ones(96), bits=4, then="fp8"), "then='fp8': the quantizer after"),
    (lambda w, h: compression.fp8(w, group_size=7), "group_size=7 does not divide the layer's 96 inputs"),
])
def test_bad_requests_are_one_line_errors(layer, call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(layer[0], layer[2])


def reference_dequantize(stored, inputs):
    """The stored form (experiments/compression/storage.py) read back in float64: two 4-bit codes to a byte (input 2k
    low, 2k + 1 high) when the codes have fewer rows than inputs, w = scale[g] (q - zero[g]) / input_scale."""
    codes, group = np.asarray(stored["codes"]), np.asarray(stored["group"])
    if "zero" not in stored:  # e4m3 values
        return np.asarray(stored["scale"], np.float64)[group] * codes.astype(np.float64)
    if len(codes) < inputs:
        codes = np.stack([codes % 16, codes // 16], axis=1).reshape(-1, codes.shape[1])[:inputs]
    w = np.asarray(stored["scale"], np.float64)[group] * (codes - np.asarray(stored["zero"], np.float64)[group])
    return w / np.asarray(stored.get("input_scale", np.ones(inputs)), np.float64)[:, None]


@pytest.mark.parametrize("method,bits,group_size,extra", [
    ("rtn", 4, -1, {}), ("rtn", 8, 19, {"symmetric": True}), ("gptq", 3, 19, {"act_order": True, "block_size": 32}),
    ("gptq", 4, -1, {}), ("awq", 4, 19, {}), ("awq_gptq", 3, -1, {"act_order": True}), ("fp8", None, 19, {})])
def test_packed_codes_and_grids_give_back_each_quantizers_weights(layer, method, bits, group_size, extra):
    """95 inputs (an odd count: the last byte of 4-bit codes half empty), groups of 19: every quantizer's result is
    stored as codes of its bit width with its grids, and read back it is that result; GPTQ's act_order groups follow
    its quantization order (each group still 19 inputs, one grid of at most 2^b values per output)."""
    from experiments.compression import storage

    w, x, h = layer[0][:95], layer[1][:, :95], layer[2][:95, :95]
    args = {"group_size": group_size, **({} if bits is None else {"bits": bits}), **extra}
    quantize = {"rtn": lambda **a: compression.rtn(w, **a), "gptq": lambda **a: compression.gptq(w, h, **a),
                "awq": lambda **a: compression.awq(w, h, np.abs(x).mean(0), **a),
                "awq_gptq": lambda **a: compression.awq(w, h, np.abs(x).mean(0), then="gptq", **a),
                "fp8": lambda **a: compression.fp8(w, **a)}[method]
    w_hat, grids = quantize(**args, with_grid=True)
    np.testing.assert_array_equal(w_hat, quantize(**args))  # with_grid changes nothing of the result
    stored = storage.pack(w_hat, grids, bits)
    np.testing.assert_allclose(reference_dequantize(stored, 95), w_hat, rtol=1e-6, atol=1e-7 * np.abs(w_hat).max())
    np.testing.assert_allclose(storage.unpack(stored), w_hat, rtol=1e-6)  # AWQ's 1/s: float32 rounding
    assert np.bincount(stored["group"]).tolist() == [95 if group_size == -1 else 19] * (1 if group_size == -1 else 5)
    if bits is None:
        assert stored["codes"].dtype == np.dtype("float8_e4m3fn") and stored["codes"].shape == (95, 40)
        return
    assert stored["codes"].dtype == np.uint8 and stored["codes"].shape == ((48, 40) if bits <= 4 else (95, 40))
    assert stored["scale"].shape == stored["zero"].shape == (95 // (95 if group_size == -1 else 19), 40)
    assert ("input_scale" in stored) == method.startswith("awq")
    if method == "gptq" and extra.get("act_order"):
        assert not np.array_equal(stored["group"], np.arange(95) // 19)  # the quantization order's groups
