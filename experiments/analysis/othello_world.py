"""An Othello-GPT's world model (Li et al. 2023, "Emergent World Representations"; Nanda et al. 2023, "Emergent
Linear Representations in World Models of Self-Supervised Sequence Models"): what the model predicts, what its
residual stream encodes about the board, and what editing that encoding does to its predictions.

Position t of a game is read after move t (`data.othello.board_states`). Each square's state there, in two bases:

    absolute   0 empty, 1 black, 2 white
    relative   0 empty, 1 mine (the player to move next), 2 theirs

Legal moves: with E_t the legal squares of the player to move next and p the model's next-move distribution
(token s + 1 is square s),

    top-1 legal = [argmax_s p(s) in E_t],      legal probability = sum_{s in E_t} p(s).

Interventions. A linear probe of layer l in the relative basis reads square s as z_c(x) = ((x - mu) / sigma) W_c + b_c.
To make it read class `to` instead of `from`, the residual after layer l at position t moves along the gradient of
the margin d(x) = z_to(x) - z_from(x), g = (W_to - W_from) / sigma, until the margin is m (the median margin of the
probe on positions where the square truly is `to`):

    x' = x + (m - d(x)) g / |g|^2.

The edited board B' (square s's disc turned over) has its own legal moves E'. With N = |E'|, the intervention
succeeds when the model's N most probable squares are exactly E' (Li et al.'s error count, N - |top-N & E'|, is
zero). The control moves x by the same distance along a random direction.
"""

import numpy as np
import jax
import jax.numpy as jnp

from data import othello
from experiments.analysis import activations, patching

EMPTY, MINE, THEIRS = 0, 1, 2


def absolute_labels(boards: np.ndarray) -> np.ndarray:
    """int32 [..., s * s]: 0 empty, 1 black, 2 white."""
    flat = boards.reshape(*boards.shape[:-2], -1)
    return np.select([flat == othello.BLACK, flat == othello.WHITE], [1, 2], 0).astype(np.int32)


def relative_labels(boards: np.ndarray, players: np.ndarray) -> np.ndarray:
    """int32 [..., s * s]: 0 empty, 1 the next player's disc, 2 the other player's."""
    flat = boards.reshape(*boards.shape[:-2], -1)
    own = players[..., None]
    return np.select([flat == own, flat == -own], [MINE, THEIRS], EMPTY).astype(np.int32)


def square_probabilities(logits) -> np.ndarray:
    """[..., s * s]: the next-move distribution over the squares (token s + 1), normalised over the vocabulary."""
    return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))[..., 1:]


def legal_move_metrics(logits, legal: np.ndarray, mask: np.ndarray) -> dict:
    """{"top1_legal", "legal_probability", "positions"} over the positions where mask [G, T] is true."""
    probs = square_probabilities(logits)[mask]
    legal = legal[mask]
    top1 = legal[np.arange(len(legal)), np.argmax(probs, axis=-1)]
    return {"top1_legal": float(top1.mean()), "legal_probability": float(np.sum(probs * legal, -1).mean()),
            "positions": int(mask.sum())}


def top_n_errors(probs: np.ndarray, legal: np.ndarray) -> np.ndarray:
    """[B]: N - |top-N of probs & legal| with N = |legal| per row (Li et al.'s intervention error)."""
    errors = np.zeros(len(probs), np.int32)
    for i, (p, good) in enumerate(zip(probs, legal)):
        n = int(good.sum())
        errors[i] = n - int(good[np.argsort(-p)[:n]].sum())
    return errors


def flip_cases(boards, players, legal, rng: np.random.Generator, count: int, positions: range) -> list[dict]:
    """Up to `count` intervention cases {"game", "t", "square", "to", "edited_legal"}: a random game, a position in
    `positions` where the game goes on, and an occupied square whose disc, turned over, changes the next player's
    legal moves."""
    cases = []
    for _ in range(count * 20):
        g, t = int(rng.integers(len(boards))), int(rng.choice(positions))
        player = players[g, t]
        if player == 0:
            continue
        occupied = np.flatnonzero(boards[g, t].reshape(-1))
        square = int(rng.choice(occupied))
        edited = boards[g, t].copy()
        edited.flat[square] *= -1
        edited_legal = othello.legal_mask(edited[None], np.array([player]))[0]
        if edited_legal.any() and (edited_legal != legal[g, t]).any():
            to = MINE if edited.flat[square] == player else THEIRS
            cases.append({"game": g, "t": t, "square": square, "to": to, "edited_legal": edited_legal})
        if len(cases) == count:
            break
    return cases


def margin_edit(x, probe: dict, square, to, target_margin):
    """x' (module doc) for rows x [B, D] of one layer, the probe from `probes.fit_many` over every square; square,
    to and target_margin are one per row (or one for all)."""
    rows = len(x)
    square, to = np.broadcast_to(square, (rows,)), np.broadcast_to(to, (rows,))
    source = MINE + THEIRS - to
    weights = probe["weights"][square]  # [B, D, 3]
    direction = weights[np.arange(rows), :, to] - weights[np.arange(rows), :, source]  # [B, D]
    bias = probe["bias"][square, to] - probe["bias"][square, source]
    margin = np.sum((x - probe["mean"]) / probe["scale"] * direction, -1) + bias
    g = direction / probe["scale"]
    return x + ((np.broadcast_to(target_margin, (rows,)) - margin) / np.sum(g * g, -1))[:, None] * g


def typical_margins(x, labels, probe: dict) -> np.ndarray:
    """[S, 3]: for each square and class c in {mine, theirs}, the median margin z_c - z_other over the rows whose
    square is c (the rest 0)."""
    z = np.einsum("nd,sdc->nsc", (x - probe["mean"]) / probe["scale"], probe["weights"]) + probe["bias"]
    out = np.zeros((z.shape[1], 3), np.float32)
    for c, other in ((MINE, THEIRS), (THEIRS, MINE)):
        for s in range(z.shape[1]):
            rows = labels[:, s] == c
            if rows.any():
                out[s, c] = np.median(z[rows, s, c] - z[rows, s, other])
    return out


def edited_probabilities(model, variables, tokens, layers, positions, edit) -> np.ndarray:
    """[B, s * s]: the next-move distribution at positions [B] when, for each run-order layer in `layers` in turn,
    the residual after it at each row's position x [B, D] (as the edits of the earlier layers left it) is replaced
    by edit(layer, x) (Li et al. edit a layer and every later one)."""
    rows, positions = jnp.arange(tokens.shape[0]), jnp.asarray(positions)
    source, tree = None, None
    for done, layer in enumerate(layers, start=1):
        patched = variables if tree is None else {**variables, "patches": tree}
        _, sown = activations.capture_tree(model, patched, tokens)
        source = sown if source is None else source
        stack, member, unit = activations.layer_paths(sown)[layer]
        now = (sown[stack] if member is None else sown[stack][member])["residual"][0][unit, rows, positions]
        new = jnp.asarray(edit(layer, np.asarray(now)), now.dtype)
        source = jax.tree.map(lambda a: a, source)  # a new tree (the same arrays) to put the edits in
        scope = source[stack] if member is None else source[stack][member]
        scope["residual"] = (scope["residual"][0].at[unit, rows, positions].set(new),)
        # the other positions keep their own values: the edits are causal, and later positions are not read
        tree = patching.patches(sown, "residual", list(layers[:done]), source=source)
    logits = patching.patched_logits(model, variables, tokens, tree)
    return square_probabilities(np.asarray(logits)[np.arange(tokens.shape[0]), np.asarray(positions)])
