"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): recall the value bound to a
key earlier in the sequence, for many keys at once.

    k_1 v_1 k_2 v_2 ... k_D v_D  0 0 q_1 0 q_2 0 0 ... q_D 0      (length L, D = num_pairs)

Keys are distinct tokens from [1, V/2), values from [V/2, V), 0 is filler. After the D pairs, each
key appears once more as a query at a random position; the target at a query position is its value
(`loss_mask` 1 there only). Solving it needs a memory that holds D pairs at once: attention does;
a recurrent state must be large enough.
"""

import numpy as np


def examples(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """{"inputs", "targets", "loss_mask"}: [num_examples, seq_len] arrays, seeded."""
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = np.stack([rng.choice(np.arange(1, half), num_pairs, replace=False) for _ in range(num_examples)])
    values = rng.integers(half, vocab_size, (num_examples, num_pairs))
    inputs = np.zeros((num_examples, seq_len), np.int32)
    inputs[:, 0:2 * num_pairs:2], inputs[:, 1:2 * num_pairs:2] = keys, values
    targets = np.zeros((num_examples, seq_len), np.int32)
    loss_mask = np.zeros((num_examples, seq_len), np.float32)
    rows = np.arange(num_examples)[:, None]
    slots = np.sort(np.stack([rng.choice(np.arange(2 * num_pairs, seq_len), num_pairs, replace=False)
                              for _ in range(num_examples)]), axis=1)
    order = np.argsort(rng.random((num_examples, num_pairs)), axis=1)  # which key each query asks for
    inputs[rows, slots] = keys[rows, order]
    targets[rows, slots] = values[rows, order]
    loss_mask[rows, slots] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def validate(config) -> list[str]:
    problems = []
    if config.num_pairs < 1 or 3 * config.num_pairs > config.seq_len:
        problems.append(f"data.num_pairs={config.num_pairs} must lie in [1, seq_len / 3 = {config.seq_len // 3}] "
                        f"(pairs and queries must fit in data.seq_len={config.seq_len})")
    if config.vocab_size // 2 - 1 < config.num_pairs:
        problems.append(f"data.vocab_size={config.vocab_size} leaves {config.vocab_size // 2 - 1} keys for "
                        f"data.num_pairs={config.num_pairs} distinct keys")
    return problems
