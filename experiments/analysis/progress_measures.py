"""Progress measures for grokking modular addition (Nanda et al. 2023): the Fourier spectrum of the
embedding, and the restricted and excluded losses.

Fourier basis over Z_p: for frequency k = 1 .. (p - 1) / 2, w_k = 2 pi k / p,
    cos_k(x) = cos(w_k x),  sin_k(x) = sin(w_k x)           (x = 0 .. p - 1)
- Embedding spectrum: the norm of the token embedding E [p, d] (rows of the p number tokens)
  projected on span(cos_k, sin_k); the network that grokked uses a few key frequencies.
- Logits as a function of (a, b, c) [p, p, p]. The algorithm computes cos(w_k (a + b - c)) for the
  key frequencies; with u_k = cos(w_k (a + b - c)), v_k = sin(w_k (a + b - c)) (orthogonal over
  all triples):
    restricted logits = mean + sum_{k in key} (projection on u_k and v_k)
    excluded logits   = logits - sum_{k in key} (projection on u_k and v_k)
  Restricted loss: cross-entropy of the restricted logits on all pairs (falls early, as the
  circuit forms); excluded loss: of the excluded logits on the training pairs (rises as the
  memorising part gives way to the circuit).
"""

import numpy as np


def frequencies(p: int) -> np.ndarray:
    return np.arange(1, (p - 1) // 2 + 1)


def embedding_spectrum(embedding: np.ndarray) -> np.ndarray:
    """||projection of E [p, d] on span(cos_k, sin_k)|| for k = 1 .. (p - 1) / 2."""
    p = embedding.shape[0]
    x = np.arange(p)
    norms = []
    for k in frequencies(p):
        basis = np.stack([np.cos(2 * np.pi * k * x / p), np.sin(2 * np.pi * k * x / p)])  # [2, p]
        basis /= np.linalg.norm(basis, axis=1, keepdims=True)
        norms.append(np.linalg.norm(basis @ embedding))
    return np.array(norms)


def key_frequencies(embedding: np.ndarray, count: int = 5) -> list[int]:
    """The `count` frequencies with the largest embedding norm, ascending."""
    return sorted(int(k) for k in frequencies(embedding.shape[0])[np.argsort(-embedding_spectrum(embedding))[:count]])


def frequency_shares(maps: np.ndarray) -> np.ndarray:
    """[n, K]: the share of each map's variance over (a, b) that frequency k = 1 .. K = (p - 1) / 2 explains, for
    maps [p, p, n] (e.g. an SAE latent's activation at every pair): the power of the 2-D Fourier components
    (u, v) with u, v in {0, k, -k}, not both 0 (cos / sin of w_k a, w_k b, w_k (a + b), w_k (a - b)), over all
    the power of the centred map. The shares sum to at most 1 (the rest: components mixing two frequencies); 0
    for a constant map."""
    p = maps.shape[0]
    power = np.abs(np.fft.fft2(maps - maps.mean(axis=(0, 1)), axes=(0, 1))) ** 2
    total = power.sum(axis=(0, 1))
    shares = []
    for k in frequencies(p):
        index = np.array([0, k, p - k])
        shares.append(power[np.ix_(index, index)].sum(axis=(0, 1)))  # (0, 0) is 0 once centred
    return (np.stack(shares, axis=-1) / np.where(total > 0, total, 1.0)[:, None]).astype(np.float64)


def key_frequency_part(logits: np.ndarray, keys) -> np.ndarray:
    """The component of logits [p, p, p] (a, b, c) in span{cos, sin(w_k (a + b - c)) : k in keys}."""
    p = logits.shape[0]
    a, b, c = np.meshgrid(np.arange(p), np.arange(p), np.arange(p), indexing="ij")
    part = np.zeros_like(logits, dtype=np.float64)
    for k in keys:
        phase = 2 * np.pi * k * (a + b - c) / p
        for direction in (np.cos(phase), np.sin(phase)):
            part += np.sum(logits * direction) / np.sum(direction * direction) * direction
    return part


def _cross_entropy(logits, a, b):
    """Mean -log softmax(logits[a, b])[(a + b) mod p] over the pairs (a, b)."""
    p = logits.shape[0]
    rows = logits[a, b].astype(np.float64)
    rows = rows - rows.max(-1, keepdims=True)
    log_probs = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(a)), (a + b) % p]))


def restricted_and_excluded_loss(logits: np.ndarray, keys, train_pairs) -> tuple[float, float]:
    """(restricted loss on all pairs, excluded loss on the training pairs [n, 2])."""
    p = logits.shape[0]
    part = key_frequency_part(logits, keys)
    a, b = (x.ravel() for x in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    restricted = logits.mean() + part
    excluded = logits - part
    return _cross_entropy(restricted, a, b), _cross_entropy(excluded, train_pairs[:, 0], train_pairs[:, 1])
