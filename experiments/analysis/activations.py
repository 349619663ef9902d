"""Activations at named sites of any LM family, captured without editing model code per analysis.

The layers sow them into the "intermediates" collection only when it is mutable (models/layers.sow_site):

    residual    the residual stream after the layer                          [B, T, D]
    mixer_out   the layer's token mixer output (attention, Mamba, short conv) before it joins the residual
    ffn_out     a block's MLP / MoE output before it joins the residual
    mlp_hidden  a block's MLP hidden activation act(x W_in + b_in)                 [B, T, d_mlp]
    attention_pattern   softmax attention's weights P (GQA, MHA, MQA, QK-norm)     [B, H, T, T] (capture only)
    ssm_state   a Mamba-1 / Mamba-2 layer's recurrent state after the sequence    [B, heads, P, N] (capture only)

`capture` runs the model once with the collection mutable and returns them per layer in the order the model
runs its layers (DeepSeek's dense blocks first; a hybrid's period members in pattern order), with `embed`, the
residual stream before the first layer. A layer's residual is the previous one plus its outputs (no dropout at
analysis time): x_l = x_{l-1} + mixer_out_l (+ ffn_out_l).
"""

import jax

import models

STACK_ORDER = ("dense_layers", "layers", "periods")  # how LM.hidden runs its stacks (models/lm.py)


def _member_order(name: str) -> int:
    return int(name.split("_")[1])  # a hybrid period's members are named layer_{i}_{kind}


def layer_paths(sown: dict) -> list[tuple]:
    """Where each layer's sites live in a sown tree, in the order the model runs its layers: (stack, member or
    None, unit index) with `sown[stack]` = {site: (stacked,)} for blocks, {member: {site: (stacked,)}} for periods."""
    paths = []
    for stack in (name for name in STACK_ORDER if name in sown):
        tree = sown[stack]
        if all(isinstance(v, tuple) for v in tree.values()):
            members = [None]
        else:
            members = sorted(tree, key=_member_order)
        first = tree if members[0] is None else tree[members[0]]
        units = next(iter(first.values()))[0].shape[0]
        paths += [(stack, member, u) for u in range(units) for member in members]
    return paths


def sites_at(sown: dict, path: tuple) -> dict:
    """{site: stacked [units, ...]} of the stack (member) on `path`."""
    stack, member, _ = path
    tree = sown[stack] if member is None else sown[stack][member]
    return {site: values[0] for site, values in tree.items()}


def capture_tree(model, variables, tokens) -> tuple[jax.Array, dict]:
    """(logits, the sown "intermediates" tree) of `tokens`; ValueError if the model sows nothing."""
    logits, written = model.apply(variables, tokens, mutable=[models.INTERMEDIATES])
    sown = {k: v for k, v in written.get(models.INTERMEDIATES, {}).items() if k in STACK_ORDER}
    if not sown:
        raise ValueError(f"model {type(model).__name__} sows no activations (its layers do not call "
                         "models.layers.sow_site)")
    return logits, sown


def capture(model, variables, tokens) -> tuple[jax.Array, jax.Array, list[dict]]:
    """(logits [B, T, V], embed [B, T, D], [{site: [B, T, D]} per layer]) of `tokens` int32[B, T]."""
    logits, sown = capture_tree(model, variables, tokens)
    embed = model.apply(variables, tokens, method=model.embed_tokens)
    layers = [{site: stacked[path[2]] for site, stacked in sites_at(sown, path).items()} for path in layer_paths(sown)]
    return logits, embed, layers
