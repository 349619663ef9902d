"""Model families: pure functional Flax Linen modules (`init` / `apply`).

`MODELS` is the one name -> (module, config dataclass, validate) table the trainer reads
`config.model.name` from. The config dataclass lists every key of `config.model` for that family,
with its default; validate(config.model) returns its problems as one-line messages.
Every module has `__call__(tokens) -> logits`, `decode(tokens, cache, start)` and `init_cache(batch, max_len)`.
"""

from models import hybrid, transformer

MODELS = {
    "transformer": (transformer.Transformer, transformer.TransformerConfig, transformer.validate),
    "ssd": (hybrid.HybridLM, hybrid.SSDConfig, hybrid.validate),
    "hybrid": (hybrid.HybridLM, hybrid.HybridConfig, hybrid.validate),
}


def build(model_config):
    """ConfigDict `config.model` -> a Flax module (`init` / `apply`)."""
    module, config_cls, _ = MODELS[model_config.name]
    return module(config_cls(**model_config.to_dict()))
