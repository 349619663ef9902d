"""Activations at named sites of any LM family, captured without editing model code per analysis.

The layers sow them into the "intermediates" collection only when it is mutable (models/layers.sow_site):

    residual    the residual stream after the layer                          [B, T, D]
    mixer_out   the layer's token mixer output (attention, Mamba, short conv) before it joins the residual
    ffn_out     a block's MLP / MoE output before it joins the residual

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


def _per_layer(stack: dict) -> list[dict]:
    """[{site: [B, T, D]}] per layer of one scanned stack: {site: (stacked,)} of blocks, or {member: {...}} of
    periods."""
    if all(isinstance(v, tuple) for v in stack.values()):
        members = [stack]
    else:
        members = [stack[name] for name in sorted(stack, key=_member_order)]
    units = next(iter(members[0].values()))[0].shape[0]
    return [{site: values[0][u] for site, values in member.items()} for u in range(units) for member in members]


def capture(model, variables, tokens) -> tuple[jax.Array, jax.Array, list[dict]]:
    """(logits [B, T, V], embed [B, T, D], [{site: [B, T, D]} per layer]) of `tokens` int32[B, T]."""
    logits, written = model.apply(variables, tokens, mutable=[models.INTERMEDIATES])
    sown = written.get(models.INTERMEDIATES, {})
    stacks = [sown[name] for name in STACK_ORDER if name in sown]
    if not stacks:
        raise ValueError(f"model {type(model).__name__} sows no activations (its layers do not call "
                         "models.layers.sow_site)")
    embed = model.apply(variables, tokens, method=model.embed_tokens)
    return logits, embed, [layer for stack in stacks for layer in _per_layer(stack)]
