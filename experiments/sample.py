"""Samples text from the latest checkpoint of a language-model run.

    python -m experiments.sample --workdir=runs/lm --prompt="ROMEO:" --num_tokens=200 \
        [--temperature=0.8 --top_k=40 --top_p=0.95 --seed=0 --num_samples=2]

Reads the run's `config.json` (model and tokenizer), restores the parameters from the latest
checkpoint and generates with the KV cache (`models/sampling.py`); samples go to stdout.

Speculative decoding (`models/speculative.py`; one sequence at a time, temperature only, no top-k / top-p):
`--draft_workdir=runs/draft` drafts `--lookahead` tokens per target pass with another run's LM (same
tokenizer), `--self_speculative` drafts with the run's own MTP module (`model.mtp_depth >= 1`). Greedy
speculative output is plain greedy output; sampled output has the model's own distribution. The acceptance
rate and target passes go to stderr.

Steering (experiments/analysis/steering.py): `--steer_layer=L --steer_alpha=A` adds A v at the residual stream after layer L
at every position while generating, v the mean-difference of the residual over `--steer_toward`'s tokens and over
`--steer_away`'s (contrastive activation addition); or `--steer_sae=SAE_RUN --steer_latent=I` takes v = latent I's
decoder direction at the SAE's own site and layer, in the units of the latent's activation.
"""

import sys

from absl import app, flags, logging
import jax
import numpy as np

from data import activation_rows as store_format
from data import text
from experiments import restore
from experiments.analysis import steering
from models import sampling, speculative

_WORKDIR = flags.DEFINE_string("workdir", None, "A language-model run folder (holds config.json and checkpoints/).",
                               required=True)
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text the samples continue.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 200, "Tokens generated per sample.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples generated together, as one batch.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 picks the most likely token.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0: all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this probability mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DRAFT = flags.DEFINE_string("draft_workdir", None, "Speculative decoding: a run folder whose LM drafts tokens.")
_SELF = flags.DEFINE_bool("self_speculative", False, "Speculative decoding with the run's own MTP module 1.")
_LOOKAHEAD = flags.DEFINE_integer("lookahead", 4, "Drafts per target pass (--draft_workdir).")
_STEER_LAYER = flags.DEFINE_integer("steer_layer", None, "Steering: the residual stream after this layer (run order).")
_STEER_ALPHA = flags.DEFINE_float("steer_alpha", 1.0, "Steering: the direction's scale.")
_STEER_TOWARD = flags.DEFINE_string("steer_toward", None, "Steering: text whose mean residual v points to.")
_STEER_AWAY = flags.DEFINE_string("steer_away", None, "Steering: text whose mean residual v points from.")
_STEER_SAE = flags.DEFINE_string("steer_sae", None, "Steering: an SAE run whose decoder direction is v.")
_STEER_LATENT = flags.DEFINE_integer("steer_latent", 0, "Steering: the SAE latent (--steer_sae).")


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
    tokenizer = text.tokenizer_for(config.data)
    if config.model.vocab_size < tokenizer.vocab_size:  # checkpoints often pad their vocabulary upward
        _fail(f"the model's vocabulary ({config.model.vocab_size} tokens) is smaller than data.tokenizer="
              f"{config.data.tokenizer!r}'s ({tokenizer.vocab_size}); sampling text needs the tokenizer the model was "
              "trained with")
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
    if _STEER_SAE.value or _STEER_LAYER.value is not None:
        variables = steered_variables(model, variables, tokenizer, prompts)
    if _DRAFT.value or _SELF.value:
        return speculate(config, model, variables, prompt)
    cache = model.init_cache(_NUM_SAMPLES.value, total)
    tokens = sampling.generate(model, variables, prompts, cache, jax.random.key(_SEED.value), num_tokens=_NUM_TOKENS.value,
                               temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
    for i, row in enumerate(np.asarray(tokens)):
        print(f"--- sample {i} ---\n{_PROMPT.value}{tokenizer.decode(row)}")

def steered_variables(model, variables, tokenizer, prompts):
    """The variables with the steering collection of the --steer_* flags."""
    if _STEER_SAE.value:
        try:
            sae_config = restore.load_config(_STEER_SAE.value)
            store = store_format.description(sae_config.data.store)
            sae_model, sae_variables = restore.load_variables(sae_config, _STEER_SAE.value)
        except FileNotFoundError as e:
            _fail(str(e))
        if not 0 <= _STEER_LATENT.value < sae_config.model.num_latents:
            _fail(f"--steer_latent={_STEER_LATENT.value} is not in [0, {sae_config.model.num_latents})")
        direction = sae_model.apply(sae_variables, method=sae_model.decoder)[_STEER_LATENT.value]
        vector, layer, site = direction / sae_config.model.input_scale, store["layer"], store["site"]
    else:
        if not _STEER_TOWARD.value or not _STEER_AWAY.value:
            _fail("--steer_layer needs --steer_toward and --steer_away (texts), or use --steer_sae")
        layer, site = _STEER_LAYER.value, "residual"
        toward, away = (np.asarray([tokenizer.encode(t)]) for t in (_STEER_TOWARD.value, _STEER_AWAY.value))
        longest = max(toward.shape[1], away.shape[1])
        if getattr(model.cfg, "positional", None) == "learned" and longest > model.cfg.max_len:
            _fail(f"--steer_toward / --steer_away hold {longest} tokens, more than the model's max_len="
                  f"{model.cfg.max_len} (learned positions)")
        vector = steering.mean_difference(model, variables, layer, toward, away)
    tree = steering.steering_tree(model, variables, prompts, layer, vector, _STEER_ALPHA.value, site=site)
    return steering.steered(variables, tree)


def speculate(config, model, variables, prompt):
    if _TOP_K.value or _TOP_P.value < 1.0:
        _fail("speculative decoding samples at --temperature only; leave --top_k and --top_p unset")
    if _SELF.value and not config.model.get("mtp_depth"):
        _fail(f"--self_speculative needs a run trained with model.mtp_depth >= 1; {_WORKDIR.value!r} has none")
    if _DRAFT.value:
        try:
            draft_config = restore.load_config(_DRAFT.value)
            draft = restore.load_variables(draft_config, _DRAFT.value)
        except FileNotFoundError as e:
            _fail(str(e))
        if draft_config.model.vocab_size != config.model.vocab_size:
            _fail(f"--draft_workdir={_DRAFT.value!r}'s vocabulary ({draft_config.model.vocab_size}) is not the "
                  f"model's ({config.model.vocab_size})")
    tokenizer = text.tokenizer_for(config.data)
    for i in range(_NUM_SAMPLES.value):
        rng = jax.random.fold_in(jax.random.key(_SEED.value), i)
        kwargs = dict(temperature=_TEMPERATURE.value, rng=rng)
        if _SELF.value:
            tokens, stats = speculative.generate_with_mtp(model, variables, prompt[None], _NUM_TOKENS.value, **kwargs)
        else:
            tokens, stats = speculative.generate_with_draft_model(model, variables, *draft, prompt[None],
                                                                  _NUM_TOKENS.value, lookahead=_LOOKAHEAD.value, **kwargs)
        print(f"--- sample {i} ---\n{_PROMPT.value}{tokenizer.decode(np.asarray(tokens)[0])}")
        print(f"sample {i}: acceptance {stats.acceptance:.3f} ({stats.accepted} of {stats.drafted} drafts), "
              f"{stats.target_passes} target passes ({stats.target_positions} positions) for {_NUM_TOKENS.value} "
              "tokens", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
