"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a cheap drafter proposes tokens, the target
checks them all in one cached pass, and the caches roll back to what was accepted.

    greedy:   accept the longest prefix of drafts equal to the target's argmax, then emit the target's own next
              token (the correction, or a bonus after every draft): the output equals plain greedy decoding.
    sampled:  drafts d_j ~ q_j (temperature T); accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the
              first rejection emit a sample of norm(max(0, p_j - q_j)), after all gamma accepted one of p_{gamma+1}.
              The emitted tokens are distributed as the target's own samples (Leviathan et al., Theorem 3.5).

Rolling a cache back costs nothing: an entry past the accepted prefix is never read (a query masks keys past
its own position) and the next pass overwrites it, so each cache only tracks how many positions are valid.
Drafters: a separate small LM with its own cache (`generate_with_draft_model`, `lookahead` drafts per pass), or
the target's own MTP module 1 (`generate_with_mtp`, self-speculation: one draft per pass, models/mtp.py).
One sequence at a time (batch 1), as in the papers' latency measurements.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def accept_greedy(target_logits, drafts):
    """target_logits [gamma + 1, V] at the positions before each draft and after the last; drafts [gamma] ->
    (accepted count a, the target's token after them)."""
    predicted = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    accepted = jnp.sum(jnp.cumprod(predicted[:-1] == drafts))
    return accepted, predicted[accepted]


def accept_sampled(rng, target_probs, draft_probs, drafts):
    """Leviathan et al.'s rule: target_probs [gamma + 1, V], draft_probs [gamma, V] (each draft's distribution),
    drafts [gamma] -> (accepted count a, the token emitted after them)."""
    gamma = drafts.shape[0]
    accept_rng, emit_rng = jax.random.split(rng)
    rows = jnp.arange(gamma)
    p, q = target_probs[rows, drafts], draft_probs[rows, drafts]
    accepted = jnp.sum(jnp.cumprod(jax.random.uniform(accept_rng, (gamma,)) * q < p))
    residual = jnp.maximum(target_probs[:gamma] - draft_probs, 0.0)
    residual = residual / jnp.maximum(jnp.sum(residual, axis=-1, keepdims=True), 1e-30)
    emit = jnp.where(accepted < gamma, residual[jnp.minimum(accepted, gamma - 1)], target_probs[gamma])
    return accepted, jax.random.categorical(emit_rng, jnp.log(emit)).astype(jnp.int32)


@dataclasses.dataclass
class Stats:
    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    target_positions: int = 0  # positions the target ran (prompt included): its share of the compute
    draft_positions: int = 0  # ... and the drafter (the draft model, or the MTP module)

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _probs(logits, temperature: float):
    return jax.nn.softmax(logits / temperature, axis=-1)


def _pick(rng, logits, temperature: float):
    """A token from logits [V]: argmax at temperature 0, else a sample; and its distribution (None when greedy)."""
    if temperature == 0.0:
        return int(jnp.argmax(logits)), None
    probs = _probs(logits, temperature)
    return int(jax.random.categorical(rng, jnp.log(probs))), probs


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _call(model, method: str, variables, *args):
    """model.<method>(*args), compiled once per model, method and argument shapes (not per generation)."""
    return model.apply(variables, *args, method=getattr(model, method))


def compiled_method(model, variables, method: str):
    return functools.partial(_call, model, method, variables)


def _accept(rng, target_logits, drafts, draft_probs, temperature):
    if temperature == 0.0:
        return accept_greedy(target_logits, drafts)
    return accept_sampled(rng, _probs(target_logits, temperature), draft_probs, drafts)


def generate_with_draft_model(target, target_variables, draft, draft_variables, prompt, num_tokens: int, *,
                              lookahead: int = 4, temperature: float = 0.0, rng=None):
    """Continues int32[1, P] `prompt` by `num_tokens` tokens -> (int32[1, num_tokens], Stats)."""
    rng = jax.random.key(0) if rng is None else rng
    target_decode = compiled_method(target, target_variables, "decode")
    draft_decode = compiled_method(draft, draft_variables, "decode")
    capacity = prompt.shape[1] + num_tokens + lookahead + 1
    target_cache, draft_cache = target.init_cache(1, capacity), draft.init_cache(1, capacity)
    seq = [int(t) for t in np.asarray(prompt)[0]]
    target_valid = draft_valid = 0  # positions whose cache entries hold committed tokens
    stats = Stats()
    while len(seq) < prompt.shape[1] + num_tokens:
        n, target_valid_before, draft_valid_before = len(seq), target_valid, draft_valid
        logits, draft_cache = draft_decode(jnp.asarray([seq[draft_valid:n]], jnp.int32), draft_cache, draft_valid)
        drafts, draft_probs = [], []
        for j in range(lookahead):
            rng, pick_rng = jax.random.split(rng)
            token, probs = _pick(pick_rng, logits[0, -1], temperature)
            drafts.append(token)
            draft_probs.append(probs)
            if j < lookahead - 1:
                logits, draft_cache = draft_decode(jnp.asarray([[token]], jnp.int32), draft_cache, n + j)
        verify, target_cache = target_decode(jnp.asarray([seq[target_valid:n] + drafts], jnp.int32), target_cache,
                                             target_valid)
        rng, accept_rng = jax.random.split(rng)
        accepted, token = _accept(accept_rng, verify[0, -(lookahead + 1):], jnp.asarray(drafts, jnp.int32),
                                  None if temperature == 0.0 else jnp.stack(draft_probs), temperature)
        accepted = int(accepted)
        seq += drafts[:accepted] + [int(token)]
        target_valid, draft_valid = n + accepted, n + min(accepted, lookahead - 1)
        stats.drafted, stats.accepted, stats.target_passes = (stats.drafted + lookahead, stats.accepted + accepted,
                                                              stats.target_passes + 1)
        stats.target_positions += n - target_valid_before + lookahead
        stats.draft_positions += n - draft_valid_before + lookahead - 1
    return jnp.asarray([seq[prompt.shape[1]:prompt.shape[1] + num_tokens]], jnp.int32), stats


def generate_with_mtp(model, variables, prompt, num_tokens: int, *, temperature: float = 0.0, rng=None):
    """Self-speculative decoding with the model's MTP module 1 drafting one token per target pass ->
    (int32[1, num_tokens], Stats). Needs `model.cfg.mtp_depth >= 1`."""
    rng = jax.random.key(0) if rng is None else rng
    target_decode = compiled_method(model, variables, "decode_hidden")
    mtp_step = compiled_method(model, variables, "mtp_step")
    length = prompt.shape[1]
    capacity = length + num_tokens + 2
    cache, mtp_cache = model.init_cache(1, capacity), model.init_mtp_cache(1, capacity)
    seq = [int(t) for t in np.asarray(prompt)[0]]
    h, logits, cache = target_decode(jnp.asarray(prompt, jnp.int32), cache, 0)  # the prompt, then its next token
    rng, pick_rng = jax.random.split(rng)
    seq.append(_pick(pick_rng, logits[0, -1], temperature)[0])
    mtp_logits, mtp_cache = mtp_step(h, jnp.asarray([seq[1:]], jnp.int32), mtp_cache, 0)
    stats = Stats(target_passes=1, target_positions=length, draft_positions=length)
    while len(seq) < length + num_tokens:
        n = len(seq)
        rng, pick_rng, accept_rng = jax.random.split(rng, 3)
        draft, draft_probs = _pick(pick_rng, mtp_logits[0, -1], temperature)
        h, logits, cache = target_decode(jnp.asarray([[seq[n - 1], draft]], jnp.int32), cache, n - 1)
        accepted, token = _accept(accept_rng, logits[0], jnp.asarray([draft], jnp.int32),
                                  None if temperature == 0.0 else draft_probs[None], temperature)
        accepted = int(accepted)
        seq += [draft][:accepted] + [int(token)]
        # MTP module 1 reads (h_i, t_{i+1}) at the newly committed positions n-1 .. n+accepted-1
        mtp_logits, mtp_cache = mtp_step(h[:, :accepted + 1], jnp.asarray([seq[n:n + accepted + 1]], jnp.int32),
                                         mtp_cache, n - 1)
        stats.drafted, stats.accepted, stats.target_passes = (stats.drafted + 1, stats.accepted + accepted,
                                                              stats.target_passes + 1)
        stats.target_positions, stats.draft_positions = stats.target_positions + 2, stats.draft_positions + accepted + 1
    return jnp.asarray([seq[length:length + num_tokens]], jnp.int32), stats
