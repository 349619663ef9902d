"""Samples text from the latest checkpoint of a language-model run.

    python -m experiments.sample --workdir=runs/lm --prompt="ROMEO:" --num_tokens=200 \
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 --num_samples=2]

Reads the run's `config.json` (model and tokenizer), restores the parameters from the latest
checkpoint and generates with the KV cache (`models/sampling.py`); samples go to stdout.
"""

import sys

from absl import app, flags, logging
import jax
import numpy as np

from data import text
from experiments import restore
from models import sampling

_WORKDIR = flags.DEFINE_string("workdir", None, "A language-model run folder (holds config.json and checkpoints/).",
                               required=True)
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text the samples continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "Tokens generated per sample.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples generated together, as one batch.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 picks the most likely token.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this probability mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
        config = restore.load_config(_WORKDIR.value)
    except FileNotFoundError as e:
        _fail(str(e))
    if config.data.name != "text":
        _fail(f"the run in {_WORKDIR.value!r} trained on data.name={config.data.name!r}; sampling needs a text run")
    tokenizer = text.tokenizer(config.data.tokenizer, config.data.spm_model)
    prompt = tokenizer.encode(_PROMPT.value)
    total = len(prompt) + _NUM_TOKENS.value
    if len(prompt) == 0:
        _fail("--prompt must hold at least one token")
    if config.model.get("positional") == "learned" and total > config.model.max_len:
        _fail(f"prompt ({len(prompt)} tokens) + --num_tokens={_NUM_TOKENS.value} exceeds the model's "
              f"max_len={config.model.max_len} (learned positions); ask for at most {config.model.max_len - len(prompt)}")
    try:
        model, variables = restore.load_variables(config, _WORKDIR.value)
    except FileNotFoundError as e:
        _fail(str(e))
    prompts = np.tile(prompt[None], (_NUM_SAMPLES.value, 1))
    cache = model.init_cache(_NUM_SAMPLES.value, total)
    tokens = sampling.generate(model, variables, prompts, cache, jax.random.key(_SEED.value), num_tokens=_NUM_TOKENS.value,
                               temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
    for i, row in enumerate(np.asarray(tokens)):
        print(f"--- sample {i} ---\n{_PROMPT.value}{tokenizer.decode(row)}")

if __name__ == "__main__":
    app.run(main)
