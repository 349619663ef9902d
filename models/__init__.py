"""Model families: pure functional Flax Linen modules (`init` / `apply`).

`MODELS` is the one name -> (module, config dataclass) table the trainer reads `config.model.name` from.
The config dataclass lists every key of `config.model` for that family, with its default.
"""

from models import transformer

MODELS = {
    "transformer": (transformer.Transformer, transformer.TransformerConfig),
}


def build(model_config):
    """ConfigDict `config.model` -> a Flax module (`init` / `apply`)."""
    module, config_cls = MODELS[model_config.name]
    return module(config_cls(**model_config.to_dict()))
