"""Model families: pure functional Flax Linen modules (`init` / `apply`) over one LM skeleton (models/lm.py).

`MODELS` is the one name -> (module, config dataclass, validate) table the trainer reads
`config.model.name` from. The config dataclass lists every key of `config.model` for that family, with
its default and its valid values (data/config_fields.py); validate(config.model) returns the
cross-field problems as one-line messages.
Every LM module has `__call__(tokens, *, segment_ids=None, positions=None) -> logits` (packed rows:
models/packing.py), `decode(tokens, cache, start)` and `init_cache(batch, max_len)`;
"sae" is not an LM: a sparse autoencoder over an activation store's rows (models/sae.py), trained by the same loop.

Flax collections the trainer understands, besides "params" (trained by gradients):
- "losses": auxiliary loss terms a module sows (`self.sow("losses", name, value)`); the trainer adds
  their sum to the training loss and logs it as `aux_loss`.
- "metrics": per-step statistics a module sows; logged under their path ("layers/block_0/moe/max_violation/0",
  one entry per element of a sown array).
- "mtp": the multi-token-prediction modules' logits per depth (models/mtp.py); the trainer adds their
  weighted cross-entropy to the loss.
- "exits": early exits' logits (models/early_exit.py); the trainer scores them with the final logits, each
  weighted by its depth.
- "monitors": training-dynamics statistics (attention entropy, residual RMS, activation density) a module
  sows only when the collection is mutable (`train.monitors`): nothing is computed otherwise.
- "intermediates": activations at named sites (`models.sites`: each layer's residual stream and its mixer's and
  FFN's outputs) a module sows only when the collection is mutable (experiments/analysis/activations.py captures them);
  a "patches" collection of {"value", "mask"} per site replaces them (activation patching and ablation), a
  "steering" collection of vectors per site shifts them (steering).
- "lora": LoRA adapters {"a", "b", "rate"} per kernel in their unmerged training form (adapter dropout,
  experiments/posttrain/lora.py); the attention projections and MLP kernels add dropout(x) A B when it holds theirs.
- "probes": zero-valued variables whose cotangents carry statistics of a custom backward pass (the
  DEQ's adjoint solve); the trainer differentiates with respect to them and logs the cotangents.
- any other collection (e.g. MoE router biases): model state that the training forward pass updates
  (when the collection is mutable), kept in the train state and checkpointed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import (coconut, deq_transformer, early_exit, hybrid, mod, moe_transformer, mor, quantization, sae,
                    transformer)

MTP = "mtp"  # multi-token-prediction logits (models/mtp.py)
EXITS = early_exit.COLLECTION  # early-exit logits (models/early_exit.py)
SOWN = ("losses", "metrics", MTP, EXITS)  # written by every training forward pass, not kept
MONITORS = "monitors"  # sown only when the trainer asks (train.monitors), not kept
INTERMEDIATES = "intermediates"  # activations sown only for analyses (experiments/analysis/activations.py), not kept
NOT_STATE = (*SOWN, MONITORS, INTERMEDIATES)
PROBES = "probes"

MODELS = {
    "transformer": (transformer.Transformer, transformer.TransformerConfig, transformer.validate),
    "ssd": (hybrid.HybridLM, hybrid.SSDConfig, hybrid.validate),
    "mamba": (hybrid.HybridLM, hybrid.MambaConfig, hybrid.validate),
    "hybrid": (hybrid.HybridLM, hybrid.HybridConfig, hybrid.validate),
    "moe": (moe_transformer.MoETransformer, moe_transformer.MoEConfig, moe_transformer.validate),
    "mod": (mod.MoDTransformer, mod.MoDConfig, mod.validate),  # Mixture-of-Depths: routed blocks (models/mod.py)
    "mor": (mor.MoRTransformer, mor.MoRConfig, mor.validate),  # Mixture-of-Recursions: a shared recursed stack (models/mor.py)
    "deq": (deq_transformer.DEQTransformer, deq_transformer.DEQConfig, deq_transformer.validate),
    "coconut": (coconut.Coconut, coconut.CoconutConfig, coconut.validate),
    "sae": (sae.SparseAutoencoder, sae.SAEConfig, sae.validate),  # not an LM: trains on activations (models/sae.py)
}


def build(model_config):
    """ConfigDict `config.model` -> a Flax module (`init` / `apply`)."""
    module, config_cls, _ = MODELS[model_config.name]
    return quantization.wrap(module(config_cls(**model_config.to_dict())), model_config.get("quantization", ""))


def example_inputs(model_config, batch: int = 1) -> jax.ShapeDtypeStruct:
    """What the family's __call__ takes: int32 tokens [batch, max_len], or an SAE's float32 rows [batch, d_in]."""
    return MODELS[model_config.name][0].example_inputs(model_config, batch)


def parameter_count(model_config, seq_len: int, *, exclude: tuple[str, ...] = (), active: bool = False) -> int:
    """Trained parameters ("params") of `config.model`, from shapes only (nothing is allocated). `exclude`
    leaves out the top-level groups it names (e.g. EMBEDDINGS); `active` counts what each token uses:
    routed experts (w_gate / w_in / w_out) at top_k / num_experts of their size, Mixture-of-Depths' routed blocks
    at `capacity` of theirs, Mixture-of-Recursions' shared stack at its mean recursions per token, a DEQ's cell
    at its uses per training step (C = 6 N D, N active)."""
    shapes = jax.eval_shape(build(model_config).init, jax.random.key(0), jax.ShapeDtypeStruct((1, seq_len), jnp.int32))
    params = {k: v for k, v in nn.meta.unbox(shapes["params"]).items() if k not in exclude}
    routed_share = model_config.get("top_k", 1) / model_config.get("num_experts", 1) if active else 1.0
    family = MODELS[model_config.name][0]
    total = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        routed = getattr(path[-1], "key", None) in ("w_gate", "w_in", "w_out")
        share = family.active_share(model_config, path) if active else 1.0
        total += x.size * (routed_share if routed else 1.0) * share
    return int(total)


EMBEDDINGS = ("embed", "position_embedding", "unembed")  # the top-level groups of token / position tables


def axis_names(model, example_inputs) -> dict:
    """The logical axis names of every parameter, a tree of tuples (None for an unnamed axis), from a trace of
    `model.init` (nothing is computed); what Muon reads its matrices from (experiments/optim/optimizers.py)."""
    abstract_key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    boxed = jax.eval_shape(model.init, abstract_key, example_inputs)["params"]
    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda p: tuple(p.names) if is_boxed(p) else (None,) * len(p.shape), boxed, is_leaf=is_boxed)

from data import command_check as _command_check  # noqa: E402

_command_check.refuse_library_module(__name__, __path__[0])  # `python -m` on a module that is not a command
