"""Every cross-field rule of the model configs at its edge: the last valid value passes and the first invalid one
is refused with a message naming it (the ranges of single keys are declared with them and fuzzed by
tests/experiments/test_config_fuzz.py; these rules relate several keys, so an off-by-one in one is invisible to a
test of a value far from the edge)."""

import dataclasses

import ml_collections
import pytest

from models import (MODELS, attention_patterns, coconut, deq_transformer, early_exit, gqa, hybrid, linear_attention,
                    mla, mod, moe, moe_transformer, positions, quantization, sae)

# (rule, family whose defaults it starts from, the overrides at the edge (valid), what takes it one past the edge,
# the text of the one message that must then appear)
EDGES = {
    "heads: kv heads divide": (gqa.head_problems, "transformer", dict(d_model=96, num_heads=6, num_kv_heads=3),
                               dict(num_kv_heads=4), "model.num_kv_heads=4 must divide"),
    "heads: d_model divides": (gqa.head_problems, "transformer", dict(d_model=96, num_heads=6), dict(num_heads=5),
                               "model.d_model=96 is not divisible by model.num_heads=5"),
    "heads: head_dim frees d_model": (gqa.head_problems, "transformer", dict(d_model=96, num_heads=5, head_dim=8),
                                      dict(head_dim=0), "not divisible"),
    "sliding: window >= 1": (attention_patterns.validate, "transformer", dict(attention_pattern="sliding",
                             attention_window=1), dict(attention_window=0), "needs model.attention_window >= 1"),
    "window only for sliding": (attention_patterns.validate, "transformer", dict(attention_window=0),
                                dict(attention_window=1), "read only by model.attention_pattern='sliding'"),
    "strided: stride >= 2": (attention_patterns.validate, "transformer", dict(attention_pattern="strided",
                             sparse_stride=2), dict(sparse_stride=1), "needs model.sparse_stride >= 2"),
    "fixed: summary <= stride": (attention_patterns.validate, "transformer", dict(
        attention_pattern="fixed", sparse_stride=4, sparse_summary=4), dict(sparse_summary=5),
        "model.sparse_summary=5 must be at most model.sparse_stride=4"),
    "sparse patterns: xla only": (attention_patterns.validate, "transformer", dict(
        attention_pattern="sliding", attention_window=4, attention_impl="pallas"),
        dict(attention_pattern="strided", attention_window=0, sparse_stride=2), "needs model.attention_impl='xla'"),
    "rope: an even number >= 2 rotated": (positions.validate, "transformer", dict(d_model=64, num_heads=8,
                                          rope_fraction=0.25), dict(rope_fraction=0.125), "rotates 1 columns"),
    "rope: an even number rotated": (positions.validate, "transformer", dict(d_model=64, num_heads=8,
                                     rope_fraction=0.5), dict(rope_fraction=0.375), "rotates 3 columns"),
    "ntk: >= 4 rotated": (positions.validate, "transformer", dict(d_model=64, num_heads=8, rope_fraction=0.5,
                          rope_scaling="ntk"), dict(rope_fraction=0.25), "needs at least 4 rotated columns"),
    "scaling: rope only": (positions.validate, "transformer", dict(positional="rope", rope_scaling="linear"),
                           dict(positional="alibi"), "must be 'rope'"),
    "sinusoidal: even width": (positions.validate, "transformer", dict(positional="sinusoidal", d_model=66,
                               num_heads=6), dict(d_model=63, num_heads=7), "needs an even model.d_model, got 63"),
    "t5: distance past the exact buckets": (positions.validate, "transformer", dict(
        positional="t5", t5_buckets=32, t5_max_distance=17), dict(t5_max_distance=16),
        "model.t5_max_distance=16 must exceed model.t5_buckets // 2 = 16"),
    "t5: xla only": (positions.validate, "transformer", dict(positional="alibi", attention_impl="pallas"),
                     dict(positional="t5"), "needs model.attention_impl='xla'"),
    "moe: top_k <= experts": (moe.validate, "moe", dict(num_experts=4, top_k=4, n_groups=1), dict(top_k=5),
                              "model.top_k=5 must be <= model.num_experts=4"),
    "moe: groups need sigmoid": (moe.validate, "moe", dict(router="softmax", n_groups=1, route_scale=1.0),
                                 dict(n_groups=2), "need model.router='sigmoid'"),
    "moe: route_scale needs sigmoid": (moe.validate, "moe", dict(router="softmax", n_groups=1, route_scale=1.0),
                                       dict(route_scale=2.0), "need model.router='sigmoid'"),
    "moe: groups of >= 2": (moe.validate, "moe", dict(num_experts=8, n_groups=4, topk_groups=4, top_k=2),
                            dict(n_groups=8), "into groups of >= 2"),
    "moe: groups divide": (moe.validate, "moe", dict(num_experts=8, n_groups=4, topk_groups=4, top_k=2),
                           dict(n_groups=3, topk_groups=3), "must divide model.num_experts=8"),
    "moe: topk_groups <= groups": (moe.validate, "moe", dict(num_experts=8, n_groups=4, topk_groups=4, top_k=2),
                                   dict(topk_groups=5), "model.topk_groups=5 must be <= model.n_groups=4"),
    "moe: enough eligible experts": (moe.validate, "moe", dict(num_experts=8, n_groups=4, topk_groups=2, top_k=4),
                                     dict(top_k=5), "leave at least model.top_k=5 eligible experts"),
    "moe layers: a positive multiple": (moe_transformer.validate, "moe", dict(num_layers=5, first_k_dense_replace=1,
                                        moe_every=2), dict(first_k_dense_replace=2), "must be a positive multiple"),
    "moe layers: at least one": (moe_transformer.validate, "moe", dict(num_layers=2, first_k_dense_replace=1,
                                 moe_every=1), dict(first_k_dense_replace=2), "must be a positive multiple"),
    "mod: route_every divides": (mod.validate, "mod", dict(num_layers=6, route_every=3), dict(route_every=4),
                                 "model.num_layers=6 must be a multiple of model.route_every=4"),
    "early exit: needs exit_every": (early_exit.validate, "transformer", dict(exit_every=1, exit_threshold=0.5),
                                     dict(exit_every=0), "needs model.exit_every > 0"),
    "early exit: exit_every divides": (early_exit.validate, "transformer", dict(num_layers=6, exit_every=3),
                                       dict(exit_every=4), "must be a multiple of model.exit_every=4"),
    "early exit: a probability <= 1": (early_exit.validate, "transformer", dict(
        exit_every=1, exit_criterion="max_prob", exit_threshold=1.0), dict(exit_threshold=1.5), "0..1"),
    "early exit: no mtp": (early_exit.validate, "transformer", dict(exit_every=1, mtp_depth=0), dict(mtp_depth=1),
                           "early exit (model.exit_every) needs 0"),
    "coconut: thoughts fit the row": (coconut.validate, "coconut", dict(max_len=10, bot_position=4, max_thoughts=5),
                                      dict(bot_position=5), "exceeds the row length model.max_len=10"),
    "deq: no attention dropout": (deq_transformer.validate, "deq", dict(embed_dropout=0.1), dict(attention_dropout=0.1),
                                  "is not supported by model.name='deq'"),
    "sae: k <= latents": (sae.validate, "sae", dict(kind="topk", num_latents=16, k=16), dict(k=17),
                          "model.k=17 exceeds model.num_latents=16"),
    "sae: input_scale -1 or positive": (sae.validate, "sae", dict(input_scale=-1), dict(input_scale=0),
                                        "model.input_scale=0 must be positive"),
    "hybrid: layers a multiple of the pattern": (hybrid.validate, "hybrid", dict(layer_pattern="SA", num_layers=4),
                                                 dict(num_layers=3), "must be a multiple of len("),
    "hybrid: ssm head width divides": (hybrid.validate, "ssd", dict(d_model=48, expand=2, ssm_head_dim=32,
                                       ssm_groups=1), dict(ssm_head_dim=36), "is not divisible by model.ssm_head_dim"),
    "hybrid: groups divide the heads": (hybrid.validate, "ssd", dict(d_model=64, expand=2, ssm_head_dim=32,
                                        ssm_groups=4), dict(ssm_groups=3), "must divide the 4 SSM heads"),
    "hybrid: pallas chunks >= 16": (hybrid.validate, "ssd", dict(ssd_impl="pallas", chunk_size=16),
                                    dict(chunk_size=8), "must be a power of two >= 16"),
    "hybrid: pallas chunks a power of two": (hybrid.validate, "ssd", dict(ssd_impl="pallas", chunk_size=32),
                                             dict(chunk_size=48), "must be a power of two >= 16"),
    "mla: rope width even >= 2": (mla.MultiHeadLatentAttention.validate, "transformer", dict(
        attention="mla", qk_rope_head_dim=2), dict(qk_rope_head_dim=1), "must be even and >= 2"),
    "mla: whole unscaled rope": (mla.MultiHeadLatentAttention.validate, "transformer", dict(
        attention="mla", rope_fraction=1.0), dict(rope_fraction=0.5), "must be 'none' / 1"),
    "linear: causal only": (linear_attention.LinearAttention.validate, "transformer", dict(attention="linear"),
                            dict(attention_pattern="sliding", attention_window=2), "must be 'causal'"),
    "quantization: gqa attention only": (quantization.validate, "transformer", dict(quantization="int8",
                                         attention="qk_norm"), dict(attention="mla"), "covers GQA attention"),
}


def _config(family, overrides):
    return ml_collections.ConfigDict({**dataclasses.asdict(MODELS[family][1]()), **overrides})


@pytest.mark.parametrize("rule", EDGES)
def test_each_cross_field_rule_at_its_edge(rule):
    validate, family, valid, past, message = EDGES[rule]
    assert validate(_config(family, valid)) == [], rule
    found = validate(_config(family, {**valid, **past}))
    assert len(found) == 1 and message in found[0], (rule, found)
