"""The Othello world-model measures (experiments/analysis/othello_world.py) against direct computations: the board
labels in both bases on a hand-set position, the legal-move metrics and top-N errors by loops in float64, the probe
edit's margin and direction, the flip cases by the one-board rules, and an edited residual's effect on the next-move
distribution (at the last layer: the logit lens of the edited residual)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import othello
from experiments.analysis import activations
from experiments.analysis import othello_world as world
from models import transformer


def test_labels_in_the_absolute_and_the_relative_basis():
    board = np.array([[1, -1, 0, 0], [0, 1, 1, 0], [0, -1, -1, 0], [0, 0, 0, 0]], np.int8)
    np.testing.assert_array_equal(world.absolute_labels(board), [1, 2, 0, 0, 0, 1, 1, 0, 0, 2, 2, 0, 0, 0, 0, 0])
    white_next = world.relative_labels(board[None], np.array([othello.WHITE]))[0]
    np.testing.assert_array_equal(white_next, [2, 1, 0, 0, 0, 2, 2, 0, 0, 1, 1, 0, 0, 0, 0, 0])
    black_next = world.relative_labels(board[None], np.array([othello.BLACK]))[0]
    np.testing.assert_array_equal(black_next, world.absolute_labels(board))


def test_legal_move_metrics_and_top_n_errors_against_loops():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 17)) * 3
    legal = rng.random((3, 5, 16)) < 0.3
    legal[..., 0] = True
    mask = rng.random((3, 5)) < 0.7
    found = world.legal_move_metrics(logits, legal, mask)
    top1, mass = [], []
    for g, t in zip(*np.nonzero(mask)):
        p = np.exp(logits[g, t].astype(np.float64))
        p /= p.sum()
        top1.append(legal[g, t, np.argmax(p[1:])])
        mass.append(p[1:][legal[g, t]].sum())
    assert found["positions"] == mask.sum() and found["top1_legal"] == pytest.approx(np.mean(top1))
    assert found["legal_probability"] == pytest.approx(np.mean(mass), rel=1e-5)
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    legal_sets = np.array([[True, False, True, False], [False, False, True, True]])
    np.testing.assert_array_equal(world.top_n_errors(probs, legal_sets), [1, 0])  # top-2: {0, 1} / {3, 2}


def test_the_margin_edit_moves_along_the_probe_gradient_to_the_target_margin():
    rng = np.random.default_rng(1)
    squares, d = 4, 7
    probe = {"weights": rng.normal(size=(squares, d, 3)), "bias": rng.normal(size=(squares, 3)),
             "mean": rng.normal(size=d), "scale": rng.uniform(0.5, 2.0, size=d)}
    x = rng.normal(size=(5, d)) * 3
    for to in (world.MINE, world.THEIRS):
        other = world.MINE + world.THEIRS - to
        edited = world.margin_edit(x, probe, 2, to, 1.5)
        z = ((edited - probe["mean"]) / probe["scale"]) @ probe["weights"][2] + probe["bias"][2]
        np.testing.assert_allclose(z[:, to] - z[:, other], 1.5, atol=1e-9)
        gradient = (probe["weights"][2][:, to] - probe["weights"][2][:, other]) / probe["scale"]
        step = edited - x
        np.testing.assert_allclose(np.abs(step @ gradient), np.linalg.norm(step, axis=1) * np.linalg.norm(gradient))


def test_flip_cases_change_the_next_players_legal_moves_as_the_rules_say():
    games = othello.random_games(40, 6, np.random.default_rng(3))
    boards, players, legal = othello.board_states(games, 6)
    cases = world.flip_cases(boards, players, legal, np.random.default_rng(4), 25, range(4, 20))
    assert len(cases) == 25
    for case in cases:
        board, player = boards[case["game"], case["t"]], players[case["game"], case["t"]]
        assert board.flat[case["square"]] != 0 and 4 <= case["t"] < 20
        flipped = board.copy()
        flipped.flat[case["square"]] *= -1
        assert sorted(np.flatnonzero(case["edited_legal"])) == othello.legal_moves(flipped, player)
        assert (case["edited_legal"] != legal[case["game"], case["t"]]).any()
        assert case["to"] == (world.MINE if flipped.flat[case["square"]] == player else world.THEIRS)


def test_an_edited_residual_changes_that_position_alone_and_at_the_last_layer_reads_as_its_logit_lens():
    cfg = transformer.TransformerConfig(vocab_size=17, max_len=12, d_model=16, num_layers=2, num_heads=2, d_mlp=32,
                                        positional="learned")
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (3, 12), 1, 17)
    variables = {"params": nn.meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens)["params"])}
    _, _, per_layer = activations.capture(model, variables, tokens)
    positions = np.array([4, 7, 11])
    rows = np.arange(3)
    plain = world.square_probabilities(model.apply(variables, tokens))[rows, positions]
    for layer in (0, 1):  # the residual itself: nothing changes
        same = np.asarray(per_layer[layer]["residual"])[rows, positions]
        np.testing.assert_allclose(world.edited_probabilities(model, variables, tokens, [layer], positions,
                                                              lambda _, x: same), plain, atol=1e-6)
    edits = np.asarray(per_layer[1]["residual"])[rows, positions] + np.random.default_rng(2).normal(size=(3, 16))
    lens = model.apply(variables, jnp.asarray(edits)[:, None], method=model.lens_logits)[:, 0]
    np.testing.assert_allclose(world.edited_probabilities(model, variables, tokens, [1], positions, lambda _, x: edits),
                               world.square_probabilities(lens), atol=1e-5)
    first_edit = np.asarray(per_layer[0]["residual"])[rows, positions]
    first_edit[0] += 3.0
    moved = world.edited_probabilities(model, variables, tokens, [0], positions, lambda _, x: first_edit)
    assert np.abs(moved[0] - plain[0]).max() > 1e-3
    np.testing.assert_allclose(moved[1:], plain[1:], atol=1e-6)
    # editing layers 0 and 1 in turn: layer 1's edit sees layer 0's; an identity there changes nothing more, and a
    # replacement there is all that counts
    keep = world.edited_probabilities(model, variables, tokens, [0, 1], positions,
                                      lambda layer, x: first_edit if layer == 0 else x)
    np.testing.assert_allclose(keep, moved, atol=1e-6)
    last = world.edited_probabilities(model, variables, tokens, [0, 1], positions,
                                      lambda layer, x: first_edit if layer == 0 else edits)
    np.testing.assert_allclose(last, world.square_probabilities(lens), atol=1e-5)
