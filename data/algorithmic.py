"""The algorithmic tasks of Power et al. 2022 ("Grokking"): binary operations modulo a prime p.

Every pair (a, b) in the operation's domain is one example, written as the three tokens
`a b =` (`=` is token p); the model predicts c = a ∘ b (mod p) at the `=` position, and only there
(`loss_mask`). A seeded permutation splits the pairs into train (the first `train_fraction`) and test.

With `terms` = k > 2 the operation chains left to right over k operands and the row spells out the chain of
thought: `x_1 ... x_k = s_1 ... s_{k-1}` with s_1 = x_1 o x_2 and s_j = s_{j-1} o x_{j+1}; the loss is on
every s_j (the response), and s_{k-1} is the answer. Each step is one use of the same table, which a program
checks (the process reward of experiments/objectives/grpo.py).
"""

import numpy as np

# c(a, b) mod p, vectorised over int64 arrays; "a/b" is a * b^(p-2) (Fermat inverse), defined for b != 0.
OPERATIONS = {
    "a+b": lambda a, b, p: a + b,
    "a-b": lambda a, b, p: a - b,
    "a*b": lambda a, b, p: a * b,
    "a/b": lambda a, b, p: a * _inverse(b, p),
    "a^2+b^2": lambda a, b, p: a**2 + b**2,
    "a^2+ab+b^2": lambda a, b, p: a**2 + a * b + b**2,
    "a^2+ab+b^2+a": lambda a, b, p: a**2 + a * b + b**2 + a,
    "a^3+ab": lambda a, b, p: a**3 + a * b,
}


def _inverse(b, p):
    return np.array([pow(int(x), p - 2, p) for x in np.ravel(b)], dtype=np.int64).reshape(np.shape(b))


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def equals_token(p: int, op: str, op_token: bool) -> int:
    """The `=` token: p, or with `op_token` the operation's own, p + 1 + its index in OPERATIONS (so runs on
    different operations share one vocabulary and their inputs say which operation: what merging them needs)."""
    return p + 1 + list(OPERATIONS).index(op) if op_token else p


def vocab_size(p: int, op_token: bool) -> int:
    return p + 1 + (len(OPERATIONS) if op_token else 0)


def all_examples(p: int, op: str, op_token: bool = False) -> dict[str, np.ndarray]:
    """Every example of `op` mod p as {"inputs", "targets", "loss_mask"}: [N, 3] arrays."""
    a, b = (x.ravel().astype(np.int64) for x in np.meshgrid(np.arange(p), np.arange(p), indexing="ij"))
    if op == "a/b":
        a, b = a[b != 0], b[b != 0]
    c = OPERATIONS[op](a, b, p) % p
    n = len(a)
    inputs = np.stack([a, b, np.full(n, equals_token(p, op, op_token))], axis=1).astype(np.int32)
    targets = np.zeros((n, 3), np.int32)
    targets[:, 2] = c
    loss_mask = np.zeros((n, 3), np.float32)
    loss_mask[:, 2] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def chain_examples(p: int, op: str, terms: int, op_token: bool = False) -> dict[str, np.ndarray]:
    """Every chain x_1 o ... o x_k mod p (k = terms) as rows `x_1 ... x_k = s_1 ... s_{k-1}`: [N, 2k - 1] arrays."""
    operands = np.stack(np.meshgrid(*[np.arange(p)] * terms, indexing="ij"), axis=-1).reshape(-1, terms).astype(np.int64)
    if op == "a/b":
        operands = operands[np.all(operands[:, 1:] != 0, axis=1)]
    partials = [operands[:, 0]]
    for j in range(1, terms):
        partials.append(OPERATIONS[op](partials[-1], operands[:, j], p) % p)
    n = len(operands)
    rows = np.concatenate([operands, np.full((n, 1), equals_token(p, op, op_token)), np.stack(partials[1:], axis=1)],
                          axis=1).astype(np.int32)
    loss_mask = np.zeros((n, 2 * terms - 1), np.float32)
    loss_mask[:, terms:] = 1.0  # the targets s_1 .. s_{k-1}, read at `=` and at each s_j but the last
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": loss_mask}


def train_test_split(p: int, op: str, train_fraction: float, seed: int, terms: int = 2, op_token: bool = False):
    """(train, test) example dicts: a seeded permutation, the first `train_fraction` of it for training."""
    examples = all_examples(p, op, op_token) if terms == 2 else chain_examples(p, op, terms, op_token)
    n = len(examples["inputs"])
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(train_fraction * n)
    return ({k: v[order[:n_train]] for k, v in examples.items()},
            {k: v[order[n_train:]] for k, v in examples.items()})


def with_wrong_answers(examples: dict, p: int, seed) -> dict:
    """The examples with preference pairs: the same inputs answered c + r mod p, r uniform in 1..p-1 (always
    wrong), as "rejected_inputs", "rejected_targets", "rejected_loss_mask"."""
    shift = np.random.default_rng(seed).integers(1, p, len(examples["inputs"]))
    wrong = examples["targets"].copy()
    wrong[:, 2] = (wrong[:, 2] + shift) % p
    return {**examples, "rejected_inputs": examples["inputs"], "rejected_targets": wrong,
            "rejected_loss_mask": examples["loss_mask"]}


MAX_CHAINS = 2_000_000


def validate(config) -> list[str]:
    """Problems with `config.data` for this task, as one-line messages (empty when fine)."""
    problems = []
    if not _is_prime(config.p):
        problems.append(f"data.p={config.p} is not a prime (grokking tasks need a prime modulus, e.g. 97 or 113)")
    if config.p ** config.terms > MAX_CHAINS:
        problems.append(f"data.p={config.p} with data.terms={config.terms} gives {config.p ** config.terms} chains; at "
                        f"most {MAX_CHAINS:,} (a smaller p or fewer terms)")
    if config.terms > 2 and config.rejected:
        problems.append(f"data.rejected={config.rejected!r} needs data.terms=2 (one answer token to make wrong)")
    return problems
