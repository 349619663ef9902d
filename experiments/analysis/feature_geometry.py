"""The geometry of a toy model's features (models/toy_superposition.py; Elhage et al. 2022), from its W [m, n] alone:

    norm_i            ||W_i||                                   ~1: feature i is represented, ~0: it is not
    interference_i    sum_{j != i} (W^_i . W_j)^2               W^_i = W_i / ||W_i||: how much of other features
                                                                 feature i's direction reads (0: orthogonal to all)
    dimensionality_i  D_i = ||W_i||^2 / sum_j (W^_i . W_j)^2     the share of a dimension feature i has: 1 alone in
                                                                 its dimension, 1/2 in an antipodal pair, 2/3 in a
                                                                 triangle, 2/5 in a pentagon, 3/4 in a tetrahedron
    dimensions per feature   m / ||W||_F^2                       the hidden dimensions per represented feature

`extra_feature_phase` says, for the phase diagrams, what became of the last feature: not represented, given a
dimension of its own, or in superposition with the others; `plateau` names the configuration a dimensionality
sits at.
"""

import numpy as np

PLATEAUS = {1.0: "dedicated dimension", 3 / 4: "tetrahedron", 2 / 3: "triangle", 1 / 2: "antipodal pair",
            2 / 5: "pentagon", 3 / 8: "square antiprism"}
PHASES = ("not represented", "dedicated dimension", "superposition")


def norms(w) -> np.ndarray:
    return np.linalg.norm(np.asarray(w, np.float64), axis=0)


def _overlaps(w) -> np.ndarray:
    """[n, n]: (W^_i . W_j), rows of unrepresented features (norm 0) zero."""
    w = np.asarray(w, np.float64)
    n = norms(w)
    unit = w / np.where(n > 0, n, 1.0)
    return unit.T @ w


def interference(w) -> np.ndarray:
    overlaps = _overlaps(w)
    return np.sum(np.square(overlaps), axis=1) - np.square(np.diag(overlaps))


def dimensionality(w) -> np.ndarray:
    total = np.sum(np.square(_overlaps(w)), axis=1)
    return np.square(norms(w)) / np.where(total > 0, total, 1.0)


def dimensions_per_feature(w) -> float:
    w = np.asarray(w, np.float64)
    return w.shape[0] / float(np.sum(np.square(w)))


def extra_feature_phase(w, represented: float = 0.5, superposed: float = 0.1) -> str:
    """What became of the last feature: "not represented" (norm < `represented`), "superposition" (it reads more
    than `superposed` of the other features: interference above it), else "dedicated dimension"."""
    if norms(w)[-1] < represented:
        return "not represented"
    return "superposition" if interference(w)[-1] > superposed else "dedicated dimension"


def plateau(d: float, tolerance: float = 0.03) -> str | None:
    """The configuration whose dimensionality `d` is within `tolerance` of, if any."""
    value = min(PLATEAUS, key=lambda p: abs(p - d))
    return PLATEAUS[value] if abs(value - d) <= tolerance else None


def partners(w, threshold: float = 0.1, represented: float = 0.5) -> np.ndarray:
    """[n]: how many other represented features each feature's direction overlaps (|cos| > `threshold`): 1 in an
    antipodal pair, 2 in a triangle, 3 in a tetrahedron, 4 in a pentagon, 0 alone in its dimension."""
    w = np.asarray(w, np.float64)
    n = norms(w)
    unit = w / np.where(n > 0, n, 1.0)
    cosines = np.abs(unit.T @ unit)
    np.fill_diagonal(cosines, 0.0)
    return np.sum((cosines > threshold) & (n > represented)[None, :], axis=1)


def best_cosines(decoder, w) -> np.ndarray:
    """[n]: for each true feature direction W_i, the largest cosine any row of `decoder` [latents, m] has with it."""
    decoder, w = np.asarray(decoder, np.float64), np.asarray(w, np.float64)
    decoder = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    n = norms(w)
    return np.max(decoder @ (w / np.where(n > 0, n, 1.0)), axis=0)
