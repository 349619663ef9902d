"""Othello's rules (data/othello.py) on positions set up by hand: the opening's four moves, a capture along all eight
directions at once, lines that do not capture, a pass and the end of a game; and the synthetic game corpus."""

import numpy as np
import pytest

from data import othello

B, W = othello.BLACK, othello.WHITE


def square(name: str, size: int = 8) -> int:
    """Standard notation: column a.., row 1.. from the top ("d3" -> row 2, column 3)."""
    return (int(name[1:]) - 1) * size + "abcdefgh".index(name[0])


def board_from(rows: list[str]) -> np.ndarray:
    """'B' black, 'W' white, '.' empty."""
    return np.array([[{"B": B, "W": W, ".": 0}[ch] for ch in row] for row in rows], np.int8)


def test_the_opening_position_and_blacks_four_first_moves():
    board = othello.start(8)
    assert board[3, 3] == board[4, 4] == W and board[3, 4] == board[4, 3] == B and np.abs(board).sum() == 4
    assert sorted(othello.legal_moves(board, B)) == sorted(square(s) for s in ("d3", "c4", "f5", "e6"))
    after = othello.play(board, B, square("d3"))  # d3 flips d4
    assert after[3, 3] == B and np.abs(after).sum() == 5
    assert sorted(othello.legal_moves(after, W)) == sorted(square(s) for s in ("c3", "e3", "c5"))


def test_a_move_captures_along_all_eight_directions_and_only_closed_lines():
    board = board_from(["B..B..B.",
                        ".W.W.W..",
                        "..WWW...",
                        "BWW.WWB.",
                        "..WWW...",
                        ".W.W.W..",
                        "B..B..B.",
                        "...W...."])
    flipped = othello.flips(board, B, 3 * 8 + 3)
    expected = {(1, 1), (2, 2), (1, 3), (2, 3), (1, 5), (2, 4), (3, 1), (3, 2), (3, 4), (3, 5), (4, 2), (5, 1),
                (4, 3), (5, 3), (4, 4), (5, 5)}
    assert {divmod(s, 8) for s in flipped} == expected
    after = othello.play(board, B, 3 * 8 + 3)
    assert after[3, 3] == B and all(after[r, c] == B for r, c in expected)
    assert after[7, 3] == W  # d8 lies beyond d7's black disc, which closes the downward line: untouched
    open_line = board_from(["....", ".WW.", "....", "...."])  # white discs with no black disc behind them
    assert othello.flips(open_line, B, 1 * 4 + 0) == [] and othello.flips(open_line, B, 1 * 4 + 3) == []
    with pytest.raises(ValueError, match="not a legal move for black"):
        othello.play(open_line, B, 0)
    assert othello.flips(board, B, 0) == []  # an occupied square


def test_a_player_without_a_move_passes_and_the_game_ends_when_neither_has_one():
    # 4 x 4, white to move: white's lines of black discs all run to the edge, so white has no move and passes;
    # black's b1 closes the line c1 (white) - d1 (black). Then neither can move, with a1 still empty: the end.
    board = board_from(["..WB",
                        "BBBB",
                        "BBBB",
                        "BBBB"])
    assert othello.legal_moves(board, W) == [] and othello.legal_moves(board, B) == [1]
    after = othello.play(board, B, 1)
    np.testing.assert_array_equal(after[0], [0, B, B, B])
    assert othello.legal_moves(after, W) == [] and othello.legal_moves(after, B) == []
    full = othello.play(board_from(["W.WB", "BBBB", "BBBB", "BBBB"]), B, 1)  # the last empty square: a full board
    assert np.all(full != 0) and othello.legal_moves(full, W) == othello.legal_moves(full, B) == []


def test_replay_follows_passes_and_the_end_of_random_games():
    rng = np.random.default_rng(0)
    passes = 0
    for _ in range(60):
        game = othello.random_game(rng, 6)
        board, previous = othello.start(6), W  # black moves first
        for step, (after, mover, next_player) in enumerate(othello.replay(game, 6)):
            if mover == previous:  # the same player twice: the other had no legal move before this one
                assert othello.legal_moves(board, -mover) == []
                passes += 1
            assert np.abs(after).sum() == 5 + step  # one disc per move
            opponent_can = bool(othello.legal_moves(after, -mover))
            assert next_player == (-mover if opponent_can else (mover if othello.legal_moves(after, mover) else 0))
            board, previous = after, mover
        assert next_player == 0 and othello.legal_moves(board, B) == othello.legal_moves(board, W) == []
    assert passes > 0


def test_examples_are_the_games_shifted_by_one_and_masked_after_their_last_move():
    data = othello.examples(20, 6, seed=3)
    assert data["inputs"].shape == data["targets"].shape == (20, 32)
    np.testing.assert_array_equal(data["inputs"][:, 1:], data["targets"][:, :-1])
    for row in range(20):
        game = data["inputs"][row][data["inputs"][row] > 0] - 1  # the whole game: at most 32 moves on 6 x 6
        assert np.all(data["inputs"][row, len(game):] == 0)
        assert data["loss_mask"][row].sum() == len(game) - 1  # every move but the first is a target
        boards = list(othello.replay(game, 6))  # every move legal in turn (play raises otherwise)
        assert boards[-1][2] == 0  # and the game is over
    assert not np.array_equal(othello.examples(5, 6, seed=3)["inputs"], othello.examples(5, 6, seed=4)["inputs"])


def test_the_batched_rules_agree_with_the_one_board_rules_along_random_games():
    """legal_mask and play_batch (all games at once, by board shifts and ray walks) against legal_moves and play."""
    rng = np.random.default_rng(1)
    for size in (6, 8):
        games = [othello.random_game(rng, size) for _ in range(12)]
        positions = [(othello.start(size), B)] + [(board, player) for game in games
                                                  for board, _, player in othello.replay(game, size) if player]
        boards = np.stack([b for b, _ in positions])
        players = np.array([p for _, p in positions], np.int8)
        legal = othello.legal_mask(boards, players)
        for row, (board, player) in enumerate(positions):
            assert sorted(np.flatnonzero(legal[row])) == othello.legal_moves(board, player)
        pick = np.array([rng.choice(np.flatnonzero(row)) for row in legal])
        after = othello.play_batch(boards, players, pick)
        for row, (board, player) in enumerate(positions):
            np.testing.assert_array_equal(after[row], othello.play(board, player, pick[row]))


def test_batched_random_games_are_legal_to_their_end():
    games = othello.random_games(64, 6, np.random.default_rng(2))
    lengths = (games >= 0).sum(1)
    assert lengths.min() > 4 and lengths.max() == 32  # a full 6 x 6 board holds 32 moves
    for game, length in zip(games, lengths):
        assert np.all(game[length:] == -1)
        *_, (board, _, next_player) = othello.replay(game[:length], 6)
        assert next_player == 0


def test_board_states_replays_games_side_by_side_as_the_one_board_rules_do():
    games = othello.random_games(80, 6, np.random.default_rng(5))
    boards, players, legal = othello.board_states(games, 6)
    assert boards.shape == (80, 32, 6, 6) and players.shape == (80, 32) and legal.shape == (80, 32, 36)
    passes = 0
    for g, game in enumerate(games):
        moves, previous = game[game >= 0], othello.WHITE  # black moves first
        for t, (board, mover, next_player) in enumerate(othello.replay(moves, 6)):
            np.testing.assert_array_equal(boards[g, t], board)
            assert players[g, t] == next_player
            expected = othello.legal_moves(board, next_player) if next_player else []
            assert sorted(np.flatnonzero(legal[g, t])) == expected
            passes += mover == previous
            previous = mover
        assert np.all(players[g, len(moves):] == 0) and not legal[g, len(moves):].any()
    assert passes > 0  # the corpus has passes, and they were followed


def test_the_othello_dataset_is_registered_with_its_vocabulary_and_refuses_an_odd_board():
    import ml_collections

    import data

    config = ml_collections.ConfigDict(dict(name="othello", size=4, train_games=30, test_games=10, batch_size=8,
                                            eval_batch_size=-1))
    splits = data.load(config, seed=0)
    assert splits.vocab_size == 17 and splits.seq_len == 12 and splits.train["inputs"].shape == (30, 12)
    assert splits.evals["eval"]["inputs"].shape == (10, 12)
    assert not np.array_equal(splits.train["inputs"][:10], splits.evals["eval"]["inputs"])
    assert othello.validate(config) == []
    config.size = 7
    assert othello.validate(config) == ["data.size=7: an Othello board has an even size >= 4 (6 or 8)"]
