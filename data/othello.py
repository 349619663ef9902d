"""Othello (Reversi) on a size x size board, and synthetic games of uniformly random legal moves: the corpus of a
board-game world model (Li et al. 2023, "Emergent World Representations"; 8 x 8 there).

Rules. Black moves first from the four centre discs (white on the main diagonal's two centre squares, black on the
other two). A move places a disc of the mover's colour on an empty square such that, in at least one of the eight
directions, a contiguous line of the opponent's discs ends in one of the mover's: every such line flips. A player
with no legal move passes; the game ends when neither player has one (a full board included).

Boards are int8 [size, size]: 0 empty, 1 black, -1 white. Squares are flat indices r * size + c. A game is the list
of its moves' squares (passes are not written: who moves next follows from the position, as in Li et al.).

Tokens: square s is token s + 1; 0 pads. An example is a game: inputs its moves, targets the next move, masked after
the game's last move (`examples`).
"""

import numpy as np

DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
BLACK, WHITE, EMPTY = 1, -1, 0


def start(size: int = 8) -> np.ndarray:
    if size < 4 or size % 2:
        raise ValueError(f"size={size}: an Othello board has an even size >= 4")
    board = np.zeros((size, size), np.int8)
    c = size // 2
    board[c - 1, c - 1] = board[c, c] = WHITE
    board[c - 1, c] = board[c, c - 1] = BLACK
    return board


def flips(board: np.ndarray, player: int, square: int) -> list[int]:
    """The squares that placing `player`'s disc on `square` would flip ([] if the move is illegal)."""
    size = board.shape[0]
    row, col = divmod(square, size)
    if board[row, col] != EMPTY:
        return []
    flipped = []
    for dr, dc in DIRECTIONS:
        line, r, c = [], row + dr, col + dc
        while 0 <= r < size and 0 <= c < size and board[r, c] == -player:
            line.append(r * size + c)
            r, c = r + dr, c + dc
        if line and 0 <= r < size and 0 <= c < size and board[r, c] == player:
            flipped += line
    return flipped


def legal_moves(board: np.ndarray, player: int) -> list[int]:
    return [s for s in range(board.size) if flips(board, player, s)]


def play(board: np.ndarray, player: int, square: int) -> np.ndarray:
    """The board after `player` plays `square`; ValueError if it is not legal."""
    flipped = flips(board, player, square)
    if not flipped:
        raise ValueError(f"square {square} is not a legal move for {'black' if player == BLACK else 'white'}")
    board = board.copy()
    board.flat[[square, *flipped]] = player
    return board


def replay(moves, size: int = 8):
    """Yields (board, player who moved, player to move next or 0 at the end) after each move of a game."""
    board, player = start(size), BLACK
    for square in moves:
        if not flips(board, player, square):
            player = -player  # the other player had to pass
        board = play(board, player, square)
        mover = player
        player = -player
        if not legal_moves(board, player):
            player = -player if legal_moves(board, -player) else 0
        yield board, mover, player


def random_game(rng: np.random.Generator, size: int = 8) -> list[int]:
    """A game of uniformly random legal moves to its end."""
    board, player, moves = start(size), BLACK, []
    while True:
        legal = legal_moves(board, player)
        if not legal:
            player = -player
            legal = legal_moves(board, player)
            if not legal:
                return moves
        square = int(rng.choice(legal))
        board = play(board, player, square)
        moves.append(square)
        player = -player


def _shift(x: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """[G, s, s] -> out[g, r, c] = x[g, r + dr, c + dc] (False off the board)."""
    out = np.zeros_like(x)
    size = x.shape[1]
    rows_to, rows_from = slice(max(0, -dr), size - max(0, dr)), slice(max(0, dr), size - max(0, -dr))
    cols_to, cols_from = slice(max(0, -dc), size - max(0, dc)), slice(max(0, dc), size - max(0, -dc))
    out[:, rows_to, cols_to] = x[:, rows_from, cols_from]
    return out


def legal_mask(boards: np.ndarray, players: np.ndarray) -> np.ndarray:
    """bool [G, s * s]: the legal moves of each game's player, for boards [G, s, s] at once. With X_k the board
    read k squares along a direction, a square is legal when for some direction and j >= 2 the opponent holds
    X_1 .. X_{j-1} and the mover X_j."""
    games, size = boards.shape[0], boards.shape[1]
    own = boards == players[:, None, None]
    opponent = boards == -players[:, None, None]
    legal = np.zeros_like(own)
    for dr, dc in DIRECTIONS:
        own_k, opponent_k = _shift(own, dr, dc), _shift(opponent, dr, dc)  # k = 1
        run = opponent_k  # the opponent holds X_1 .. X_k
        for _ in range(2, size):
            own_k, opponent_k = _shift(own_k, dr, dc), _shift(opponent_k, dr, dc)
            legal |= run & own_k
            run &= opponent_k
    return (legal & (boards == EMPTY)).reshape(games, size * size)


def play_batch(boards: np.ndarray, players: np.ndarray, squares: np.ndarray) -> np.ndarray:
    """Boards [G, s, s] after each game's player plays its square (legal moves only: `legal_mask`)."""
    games, size = boards.shape[0], boards.shape[1]
    index = np.arange(games)
    rows, cols = np.divmod(squares, size)
    out = boards.copy()
    for dr, dc in DIRECTIONS:
        run = np.ones(games, bool)  # the opponent holds every square so far along the ray
        for k in range(1, size):
            r, c = rows + k * dr, cols + k * dc
            inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
            cell = np.where(inside, boards[index, np.clip(r, 0, size - 1), np.clip(c, 0, size - 1)], EMPTY)
            closes = run & (k > 1) & (cell == players)
            for j in range(1, k):  # X_k closes the run X_1 .. X_{k-1}: it flips
                out[index[closes], rows[closes] + j * dr, cols[closes] + j * dc] = players[closes]
            run &= cell == -players
    out[index, rows, cols] = players
    return out


def random_games(num_games: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """int32 [G, s * s - 4]: games of uniformly random legal moves, played side by side, -1 after each one's end."""
    boards = np.repeat(start(size)[None], num_games, axis=0)
    players = np.full(num_games, BLACK, np.int8)
    moves = np.full((num_games, game_length(size)), -1, np.int32)
    live = np.ones(num_games, bool)
    for turn in range(game_length(size)):
        legal = legal_mask(boards, players)
        stuck = ~legal.any(1)
        players = np.where(stuck, -players, players).astype(np.int8)  # no move: pass
        legal = np.where(stuck[:, None], legal_mask(boards, players), legal)
        live &= legal.any(1)  # neither player can move: the game is over
        if not live.any():
            break
        choice = np.argmax(np.where(legal, rng.random(legal.shape), -1.0), axis=1)  # uniform over the legal moves
        boards[live] = play_batch(boards[live], players[live], choice[live])
        moves[live, turn] = choice[live]
        players = np.where(live, -players, players).astype(np.int8)
    return moves


def board_states(games: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Games int32 [G, T] (squares, -1 after the end) replayed side by side: (boards int8 [G, T, s, s] after each
    move, the player to move next [G, T] (0 once the game is over, and after its end), that player's legal moves
    bool [G, T, s * s]). A recorded move that is illegal for the player on turn means that player passed."""
    num_games, turns = games.shape
    boards = np.repeat(start(size)[None], num_games, axis=0)
    players = np.full(num_games, BLACK, np.int8)
    out_boards = np.zeros((num_games, turns, size, size), np.int8)
    out_players = np.zeros((num_games, turns), np.int8)
    out_legal = np.zeros((num_games, turns, size * size), bool)
    for t in range(turns):
        live = games[:, t] >= 0
        square = np.maximum(games[:, t], 0)
        legal = legal_mask(boards, players)
        players = np.where(legal[np.arange(num_games), square], players, -players).astype(np.int8)  # a pass
        boards[live] = play_batch(boards[live], players[live], square[live])
        players = (-players).astype(np.int8)
        legal = legal_mask(boards, players)
        stuck = ~legal.any(1)
        players = np.where(stuck, -players, players).astype(np.int8)
        legal = np.where(stuck[:, None], legal_mask(boards, players), legal)
        over = ~legal.any(1) | ~live
        out_boards[:, t] = boards
        out_players[:, t] = np.where(over, 0, players)
        out_legal[:, t] = legal & ~over[:, None]
    return out_boards, out_players, out_legal


def game_length(size: int) -> int:
    """The most moves a game can have: every square but the four it starts with."""
    return size * size - 4


def vocab_size(size: int) -> int:
    return size * size + 1  # the squares and the padding token 0


def validate(config) -> list[str]:
    if config.size % 2 or config.size < 4:
        return [f"data.size={config.size}: an Othello board has an even size >= 4 (6 or 8)"]
    return []


def examples(num_games: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """{"inputs", "targets", "loss_mask"} [num_games, size^2 - 4]: each row a random game's move tokens, the next
    move as its target, masked from the game's last move on (a game may end early)."""
    games = random_games(num_games, size, np.random.default_rng(seed))
    tokens = np.concatenate([games + 1, np.zeros((num_games, 1), np.int32)], axis=1)  # -1 (after the end) -> 0
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return {"inputs": inputs, "targets": targets, "loss_mask": (targets > 0).astype(np.float32)}
