"""Speculative decoding (models/speculative.py) and multi-token prediction (models/mtp.py): greedy speculative
output equals plain greedy decoding token for token (a draft model, and MTP self-speculation); the sampled
acceptance rule's output distribution equals the target's, by counting; the MTP loss through the trainer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import losses
from experiments.training import metrics_writer, trainer
from models import sampling, speculative, transformer
from tests.conftest import make_tiny_lm_config


def _lm(seed, layers=2, **extra):
    cfg = transformer.TransformerConfig(vocab_size=13, max_len=64, d_model=16, num_layers=layers, d_mlp=32, num_heads=2,
                                        **extra)
    model = transformer.Transformer(cfg)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))
    variables.pop("mtp", None)
    return model, variables


PROMPT = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)


def _greedy(model, variables, num_tokens):
    return sampling.generate(model, variables, PROMPT, model.init_cache(1, PROMPT.shape[1] + num_tokens),
                             jax.random.key(0), num_tokens=num_tokens, temperature=0.0)


def test_accept_greedy_takes_the_longest_matching_prefix_then_the_targets_token():
    logits = jax.nn.one_hot(jnp.asarray([2, 7, 1, 4]), 9)  # the target's argmax at 4 positions
    assert [int(x) for x in speculative.accept_greedy(logits, jnp.asarray([2, 7, 5]))] == [2, 1]  # correction
    assert [int(x) for x in speculative.accept_greedy(logits, jnp.asarray([2, 7, 1]))] == [3, 4]  # bonus
    assert [int(x) for x in speculative.accept_greedy(logits, jnp.asarray([0, 7, 1]))] == [0, 2]


def test_the_sampled_rule_emits_the_targets_distribution_by_counting():
    """Vocabulary 4, gamma 2, fixed target p_j and draft q_j (drafts drawn from q): over 200,000 draws the first
    emitted token is distributed as p_0, the second (when the first draft was accepted) as p_1, and the bonus token
    after both drafts were accepted as p_2."""
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.dirichlet(np.ones(4), size=3), jnp.float32)  # [gamma + 1, V]
    q = jnp.asarray(rng.dirichlet(np.ones(4), size=2), jnp.float32)  # [gamma, V]

    def one(key):
        draft_key, accept_key = jax.random.split(key)
        drafts = jax.random.categorical(draft_key, jnp.log(q)).astype(jnp.int32)  # [gamma]
        accepted, token = speculative.accept_sampled(accept_key, p, q, drafts)
        first = jnp.where(accepted >= 1, drafts[0], token)
        second = jnp.where(accepted >= 2, drafts[1], token)
        return first, second, accepted, token

    first, second, accepted, token = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), 200_000))
    np.testing.assert_allclose(np.bincount(np.asarray(first), minlength=4) / first.size, p[0], atol=5e-3)
    after_accept = np.asarray(second)[np.asarray(accepted) >= 1]
    np.testing.assert_allclose(np.bincount(after_accept, minlength=4) / after_accept.size, p[1], atol=6e-3)
    bonus = np.asarray(token)[np.asarray(accepted) == 2]
    assert bonus.size > 20_000
    np.testing.assert_allclose(np.bincount(bonus, minlength=4) / bonus.size, p[2], atol=1e-2)
    # the acceptance rate is sum_v min(p, q) (Leviathan et al. §3.3)
    np.testing.assert_allclose(np.mean(np.asarray(accepted) >= 1), float(jnp.sum(jnp.minimum(p[0], q[0]))), atol=5e-3)


# the target drafting for itself (every draft accepted: the draft's cache stays in step), and another LM (drafts
# rejected, both caches rewound)
@pytest.mark.parametrize("draft_seed,lookahead", [(0, 3), (7, 4)])
def test_greedy_speculative_decoding_with_a_draft_model_equals_plain_greedy(draft_seed, lookahead):
    target, target_vars = _lm(0, layers=2)
    draft, draft_vars = _lm(draft_seed, layers=2 if draft_seed == 0 else 1)
    tokens, stats = speculative.generate_with_draft_model(target, target_vars, draft, draft_vars, PROMPT, 12,
                                                          lookahead=lookahead)
    np.testing.assert_array_equal(tokens, _greedy(target, target_vars, 12))
    if draft_seed == 0:  # every pass after the first reads the last committed token: the target runs it and the
        # drafts, the draft model the two positions it has not run (the bonus's and the last draft's) and g - 1 more
        passes = -(-12 // (lookahead + 1))
        assert stats.acceptance == 1.0 and stats.target_passes == passes
        assert stats.target_positions == 5 + lookahead + (passes - 1) * (lookahead + 1)
        assert stats.draft_positions == 5 + lookahead - 1 + (passes - 1) * (lookahead + 1)
    else:
        assert stats.accepted < stats.drafted
    assert stats.target_passes <= 12 and stats.drafted == lookahead * stats.target_passes


@pytest.mark.slow
def test_greedy_self_speculation_with_the_mtp_module_equals_plain_greedy():
    model, variables = _lm(3, mtp_depth=1)
    tokens, stats = speculative.generate_with_mtp(model, variables, PROMPT, 17)
    np.testing.assert_array_equal(tokens, _greedy(model, variables, 17))
    assert stats.drafted == stats.target_passes - 1 and 0 <= stats.accepted <= stats.drafted
    assert stats.target_positions == 5 + 2 * stats.drafted and stats.draft_positions == 5 + stats.drafted + stats.accepted


@pytest.mark.slow
def test_sampled_speculative_decoding_accepts_every_draft_of_the_target_itself():
    """q = p: every draft is accepted (u q < p always), and the tokens are the vocabulary's."""
    target, variables = _lm(0)
    tokens, stats = speculative.generate_with_draft_model(target, variables, target, variables, PROMPT, 12,
                                                          lookahead=3, temperature=0.8, rng=jax.random.key(5))
    assert stats.acceptance == 1.0 and tokens.shape == (1, 12) and int(tokens.max()) < 13


@pytest.fixture(scope="module")
def mtp_lm():
    """A 2-depth MTP model and its training pass's depth logits, compiled once for rows [2, 9]."""
    model, variables = _lm(1, mtp_depth=2)
    return model, variables, jax.jit(lambda t: model.apply(variables, t, mutable=["mtp"])[1]["mtp"]["logits"])


def test_mtp_depth_logits_score_the_tokens_k_ahead(mtp_lm):
    """Depth k's logits [B, L - k, V] are scored against targets[:, k:]; counts over the shifted mask."""
    model, variables, depth_logits = mtp_lm
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 13)
    depth_logits = depth_logits(tokens)
    assert [x.shape for x in depth_logits] == [(2, 8, 13), (2, 7, 13)]
    mask = jnp.ones((2, 9)).at[:, 8].set(0.0)
    sums = losses.mtp_sums(depth_logits, tokens, mask)
    counts = losses.mtp_counts(mask, 2)
    assert float(counts["mtp_loss_1"]) == 14 and float(counts["mtp_loss_2"]) == 12
    log_p = jax.nn.log_softmax(depth_logits[1], -1)
    want = -jnp.sum(jnp.take_along_axis(log_p, tokens[:, 2:, None], -1)[..., 0] * mask[:, 2:])
    np.testing.assert_allclose(sums["mtp_loss_2"], want, rtol=1e-5)
    assert "mtp" not in jax.eval_shape(lambda t: model.apply(variables, t, mutable=["losses"]), tokens)[1]  # dropped


def test_mtp_logits_read_exactly_the_tokens_up_to_i_plus_k_and_module_1_decodes_like_training(mtp_lm):
    """Depth k at position i reads Emb(t_{i+k}) and the main model's h_i (so t_0..t_{i+k}), never t_{i+k+1}:
    changing one token moves exactly the depth-k logits at positions >= (its index - k). Module 1 run through
    its decoding cache (`mtp_step`, what self-speculation drafts with) gives the training pass's depth-1 logits."""
    model, variables, depth_logits = mtp_lm
    tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 13)
    base = depth_logits(tokens)
    for changed in (3, 6):
        moved = depth_logits(tokens.at[0, changed].set((tokens[0, changed] + 1) % 13))
        for k, (before, after) in enumerate(zip(base, moved), 1):
            differs = np.abs(np.asarray(after - before)).max(-1)[0] > 1e-6  # [L - k]
            np.testing.assert_array_equal(differs, np.arange(9 - k) >= changed - k, err_msg=f"depth {k}")
    row = tokens[:1]
    h, _, _ = model.apply(variables, row, model.init_cache(1, 9), 0, method=model.decode_hidden)
    first, cache = model.apply(variables, h[:, :4], row[:, 1:5], model.init_mtp_cache(1, 9), 0, method=model.mtp_step)
    rest, _ = model.apply(variables, h[:, 4:8], row[:, 5:9], cache, 4, method=model.mtp_step)
    np.testing.assert_allclose(jnp.concatenate([first, rest], 1), base[0][:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.slow  # by default the depth-loss and the read-exactly tests
def test_the_trainer_adds_the_weighted_mtp_loss_and_logs_each_depth(accumulate, tmp_path):
    config = make_tiny_lm_config(steps=3)
    config.model.update(mtp_depth=2, positional="rope")
    config.train.update(mtp_weight=0.5, grad_accum_steps=accumulate)
    trainer.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], verbose=False)
    events = metrics_writer.read(str(tmp_path), "train")
    assert all(e["mtp_loss/1"] > 0 and e["mtp_loss/2"] > 0 for e in events)
    assert events[-1]["mtp_loss/1"] < events[0]["mtp_loss/1"]  # the module learns
    weights = losses.mtp_weight_schedule(0.3, 0.1, 0.5, 10)
    assert [float(weights(s)) for s in (0, 4, 5, 9)] == pytest.approx([0.3, 0.3, 0.1, 0.1])
