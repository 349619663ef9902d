"""lm-evaluation-harness on our models: the `beyond` model backend of `lm_eval` (EleutherAI's harness).

    lm_eval.simple_evaluate(model="beyond", model_args="workdir=RUN", tasks=[...])   # after importing this module
    python -m experiments.lm_eval --workdir=RUN --tasks=T --output=FILE.json          # the project's command
    python -m experiments.lm_eval run --model beyond --model_args workdir=RUN --tasks T  # lm_eval's own command line

`BeyondLM` implements the harness's three request types on a run's checkpoint (the weights it evaluates), placed
on the run's mesh by the trainer's logical rules (or, when the run's mesh does not fit these devices, on all of
them along `data`):
- `loglikelihood(context, continuation)`: the context and continuation tokenized as the harness does for causal
  models (the whole string, split after the context's tokens; trailing spaces move to the continuation), the
  last `max_length + 1` tokens kept, one forward pass per batch: sum_i log p(continuation_i | prefix), and
  whether every continuation token is the argmax. Requests are sorted by length and padded on the right to a
  multiple of 32 tokens (one compile per such length; causal masking makes the padding invisible).
- `loglikelihood_rolling(text)`: the text's tokens in disjoint windows of `max_length` (each conditioned on the
  tokens before it, the first on `prefix_token_id`), `lm_eval.utils`' windowing; the sum over windows.
- `generate_until(context, until, max_gen_toks)`: the KV-cached sampler (models/sampling.py; greedy unless the
  task asks for `do_sample` with a temperature), the context's last `max_length - max_gen_toks` tokens as the
  prompt, the text cut before the first stop string. Requests with equal prompt lengths share one batch.

`prefix_token_id` (what an empty context is conditioned on) is the tokenizer's end-of-text token when it has
one, else the newline's id (byte-level runs have no special tokens); pass `prefix_token_id=N` to choose.
Needs the `[eval]` extra (`lm_eval`).
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as harness_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

import models
from data import text
from data.config_fields import ConfigError
from experiments import restore
from experiments.objectives import frozen
from experiments.training import sharding

LENGTH_MULTIPLE = 32  # padded lengths: one compile per multiple


def _mesh(config):
    """The run's mesh on these devices, or all of them along `data` when it does not fit."""
    devices = jax.devices()
    try:
        shape = sharding.mesh_shape(config.mesh, len(devices))
    except ConfigError:
        shape = sharding.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}, len(devices))
    return sharding.make_mesh(shape, devices)


@functools.partial(jax.jit, static_argnums=0)
def _scores(apply, variables, inputs, targets, mask):
    """(sum of log p(target) over the mask, whether every masked target is the argmax) per row."""
    logits = apply(variables, inputs).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.sum(picked * mask, axis=-1), jnp.all(greedy | (mask == 0), axis=-1)


def check_language_model(config, named: str) -> None:
    """ConfigError (one line) unless the run is a language model whose config names its tokenizer."""
    if "tokenizer" not in config.data:
        raise ConfigError(f"{named} trained on data.name={config.data.get('name')!r}; lm_eval scores text, so the run "
                          "must be a language model whose config.data names its tokenizer (data.name='text')")


@register_model("beyond")
class BeyondLM(TemplateLM):
    """A run folder as an `lm_eval` model; `model_args`: `workdir=RUN`, optionally with `step=N`, `max_length=L`,
    `prefix_token_id=T`, `max_gen_toks=G` (comma-separated)."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 prefix_token_id: int | None = None, max_gen_toks: int = 256, **unused):
        super().__init__()
        del unused  # the harness passes device and max_batch_size to every backend
        config = restore.load_config(workdir)
        check_language_model(config, f"--workdir={workdir!r}")
        mesh = _mesh(config)
        length = int(max_length or config.model.max_len)
        apply, variables, _ = frozen.load(config, workdir, mesh, length, step=None if step is None else int(step))
        self._setup(config, apply, variables, mesh, batch_size, length, prefix_token_id, max_gen_toks)

    @classmethod
    def in_memory(cls, config, apply, variables, mesh, **options) -> "BeyondLM":
        """The backend on variables already placed on `mesh` (the trainer's evaluated weights)."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(config, apply, variables, mesh, options.get("batch_size", 8),
                  int(options.get("max_length") or config.model.max_len), options.get("prefix_token_id"),
                  options.get("max_gen_toks", 256))
        return lm

    def _setup(self, config, apply, variables, mesh, batch_size, max_length: int, prefix_token_id, max_gen_toks):
        if max_length > config.model.max_len and config.model.positional == "learned":
            raise ConfigError(f"max_length={max_length} exceeds the learned position table "
                              f"(model.max_len={config.model.max_len})")
        self.config, self.apply, self.variables, self.mesh = config, apply, variables, mesh
        self.module = models.build(config.model)
        self.tokenizer_ = text.tokenizer_for(config.data)
        self.batch_shards = sharding.batch_shards(mesh)
        self.model_max_length = max_length
        size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 8
        self._batch_size = -(-size // self.batch_shards) * self.batch_shards
        self.max_gen_toks = int(max_gen_toks)
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else self._default_prefix()

    def _default_prefix(self) -> int:
        inner = getattr(self.tokenizer_, "_tokenizer", None)
        for name in ("<|endoftext|>", "</s>", "<eos>"):
            found = inner.token_to_id(name) if inner is not None else None
            if found is not None:
                return int(found)
        return int(self.tokenizer_.encode("\n")[-1])

    # What the harness asks of a backend ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._prefix

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self.model_max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        del add_special_tokens, kwargs
        return [int(t) for t in self.tokenizer_.encode(string)]

    def tok_decode(self, tokens) -> str:
        return self.tokenizer_.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        del disable_tqdm, kwargs
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results = [None] * len(rows)
        for start in range(0, len(order), self._batch_size):
            chosen = order[start:start + self._batch_size]
            for i, score in zip(chosen, self._score_batch([rows[i] for i in chosen])):
                results[i] = score
        return results

    def _score_batch(self, rows) -> list[tuple[float, bool]]:
        longest = max(len(r[0]) for r in rows)
        length = max(longest, min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, self.max_length))
        batch = self._batch_size
        inputs, targets, mask = (np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32),
                                 np.zeros((batch, length), np.float32))
        for k, (row_inputs, row_targets, scored) in enumerate(rows):
            n = len(row_inputs)
            inputs[k, :n], targets[k, :n], mask[k, n - scored:n] = row_inputs, row_targets, 1.0
        placed = jax.device_put((inputs, targets, mask), sharding.batch_sharding(self.mesh))
        with sharding.use_mesh(self.mesh):
            logp, greedy = jax.device_get(_scores(self.apply, self.variables, *placed))
        return [(float(logp[k]), bool(greedy[k])) for k in range(len(rows))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        del disable_tqdm
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(harness_utils.make_disjoint_window, harness_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        del disable_tqdm
        groups = collections.defaultdict(list)
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            settings = dict(gen_kwargs)
            until = settings.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = int(settings.pop("max_gen_toks", self.max_gen_toks))
            if new_tokens >= self.max_length:
                raise ValueError(f"max_gen_toks={new_tokens} leaves no room for a prompt in max_length={self.max_length}")
            temperature = float(settings.pop("temperature", 0.0)) if settings.pop("do_sample", False) else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - new_tokens):]
            groups[(len(prompt), new_tokens, temperature)].append((index, prompt, until))
        outputs = [""] * len(requests)
        for (length, new_tokens, temperature), members in groups.items():
            prompts = np.asarray([prompt for _, prompt, _ in members], np.int32)
            generated = self._generate(prompts, new_tokens, temperature)
            for (index, _, until), tokens in zip(members, generated):
                outputs[index] = _cut(self.tok_decode(tokens), until)
        return outputs

    def _generate(self, prompts: np.ndarray, new_tokens: int, temperature: float) -> np.ndarray:
        from models import sampling

        cache = self.module.init_cache(len(prompts), prompts.shape[1] + new_tokens)
        with sharding.use_mesh(self.mesh):
            tokens = sampling.generate(self.module, self.variables, jnp.asarray(prompts), cache, jax.random.key(0),
                                       num_tokens=new_tokens, temperature=temperature)
        return np.asarray(jax.device_get(tokens))


def _cut(generated: str, until: list[str]) -> str:
    """The text before the first stop string."""
    for stop in until:
        if stop:
            generated = generated.split(stop)[0]
    return generated
