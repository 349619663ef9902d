"""Verifiers as the step problems' `value`: a function of token sequences (prompt and steps) -> float[n] in [0, 1].

    model_verifier    a trained outcome or process reward model (data/verifier_rows.py: an LM over the policy's
                      vocabulary V and two label tokens NO = V, YES = V + 1): p = sigmoid(logit_YES - logit_NO) at
                      each sequence's last token, sequences right-padded to one length (one compiled pass)
    checker_verifier  the exact checker of a problem (experiments/test_time/tasks.py): 1 when every step so far is
                      the reference's, else 0 (a perfect process reward model, for comparison)
"""

import jax
import jax.numpy as jnp
import numpy as np


def model_verifier(model, variables, policy_vocab: int, width: int, batch_size: int = 64):
    """The verifier run on sequences of up to `width` tokens, `batch_size` at a time."""
    @jax.jit
    def scores(tokens, last):
        logits = model.apply(variables, tokens)[jnp.arange(tokens.shape[0]), last]
        return jax.nn.sigmoid(logits[:, policy_vocab + 1] - logits[:, policy_vocab])

    def verify(sequences) -> np.ndarray:
        out = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            tokens = np.zeros((batch_size, width), np.int32)
            for row, sequence in enumerate(chunk):
                tokens[row, :len(sequence)] = sequence
            last = np.array([len(s) - 1 for s in chunk] + [0] * (batch_size - len(chunk)), np.int32)
            out.append(np.asarray(scores(tokens, last))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros(0)

    return verify


def checker_verifier(task, prompt_len: int, reference):
    """1.0 for a sequence whose response steps are all the reference's so far, else 0.0."""
    def verify(sequences) -> np.ndarray:
        return np.array([float(all(task.step_labels(s[prompt_len:], reference) or [True])) for s in sequences])

    return verify
