"""The one training loop every experiment runs.

    1. resolve and validate the config (before anything compiles)
    2. set up the mesh
    3. build data, model, optimizer, and the shardings of the train state
    4. restore the newest good checkpoint (damaged ones are reported and set aside), or initialise
    5. compile the train and eval steps
    6. loop: step, log, evaluate, checkpoint; stop cleanly on SIGTERM; on a non-finite loss roll back to
       the last good checkpoint past the batches that diverged (`train.nan_rollbacks` times), then stop loudly

With a curriculum (data whose `Splits.stages` are set, e.g. Coconut's), each stage's first step resets
the optimizer state; the stage is part of the train state, so a resumed run continues in its stage.

Train metrics are fetched from the device only every `log_every` steps (and before each checkpoint),
so dispatch runs ahead of the host; every step's loss is still checked before a checkpoint is written.

A resumed workdir must hold the same run: the config and the data's identity are recorded on the first
start and checked on every later one (experiments/run_record.py).
"""

import functools
import json
import os
import signal
import sys
import time

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import data as datasets
import models
from data import pipeline
from experiments import (checkpointing, distill, grpo, lora, losses, metrics_writer, monitors, optimizers, plots,
                         preference, run_record, sharding, validation, warm_start)


class TrainState(train_state.TrainState):
    rng: jax.Array  # raw uint32 key; step s uses fold_in(rng, s)
    model_state: Any = flax.struct.field(default_factory=dict)  # the model's other collections (models/__init__.py)
    stage: jax.Array = 0  # int32 curriculum stage (0 without a curriculum)
    data_skipped: jax.Array = 0  # int32 batches skipped by NaN rollbacks: step s trains on batch s + data_skipped
    ema_params: Any = flax.struct.field(default_factory=dict)  # train.ema_decay > 0: the weights' moving average


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the last good checkpoint."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def resolve(config, splits: datasets.Splits):
    """Fills the values left to derive (0 in `config.model`) from the data; returns a new config."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for key, value in (("vocab_size", splits.vocab_size), ("max_len", splits.seq_len)):
            if key in config.model and not config.model[key]:  # an SAE has neither
                config.model[key] = value
        for key, value in splits.model_keys.items():  # layout keys the data decides (-1: "from the data")
            if config.model.get(key) == -1:
                config.model[key] = value
    return config


def batch_size(requested: int, num_examples: int, batch_shards: int) -> int:
    """-1 means the whole split, rounded up to a multiple of the batch shards (padding rows are masked)."""
    return -(-num_examples // batch_shards) * batch_shards if requested == -1 else requested


def make_optimizer(config, model, example_inputs):
    """`config.optimizer` as an optax transformation; Muon and Shampoo also get the parameters' logical axis names."""
    names = models.axis_names(model, example_inputs) if config.optimizer.name in optimizers.NEEDS_AXIS_NAMES else None
    return optimizers.build(lora.optimizer_config(config), config.train.steps, axis_names=names)


def init_state(model, tx, example_inputs, rng, ema: bool = False, lora_config: lora.LoRAConfig = lora.LoRAConfig()):
    """The initial train state; with `ema` its moving average of the weights starts at the weights; with
    `lora_config.rank` the parameters gain adapters and the state's apply function merges them in."""
    params_rng, state_rng = jax.random.split(rng)
    variables = dict(model.init(params_rng, jnp.zeros(example_inputs.shape, example_inputs.dtype)))  # traced: free
    params = variables.pop("params")
    apply_fn = model.apply
    if lora_config.rank:
        params = lora.add_adapters(params, lora_config, jax.random.fold_in(params_rng, 1))
        apply_fn = lora.MergedApply(model.apply, lora_config.alpha, lora_config.dropout)
    model_state = {k: v for k, v in variables.items() if k not in models.NOT_STATE}
    return TrainState.create(apply_fn=apply_fn, params=params, tx=tx, rng=state_rng, model_state=model_state,
                             stage=jnp.zeros((), jnp.int32), data_skipped=jnp.zeros((), jnp.int32),
                             ema_params=params if ema else {})


def begin_stage(state: TrainState, stage, *, tx) -> TrainState:
    """The state at the start of curriculum stage `stage`: a fresh optimizer state, the same parameters."""
    return state.replace(opt_state=tx.init(state.params), stage=jnp.asarray(stage, jnp.int32))


def _flat_metrics(tree, prefix="") -> dict:
    """Sown metrics / probe cotangents -> {"path/name": scalar}; arrays (e.g. stacked over scanned layers,
    or per expert) give one entry per element, "path/name/i" or "path/name/i/j"."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path if not isinstance(k, jax.tree_util.SequenceKey)]
        name = prefix + "/".join(keys)
        for index in np.ndindex(leaf.shape):
            flat["/".join([name, *map(str, index)])] = leaf[index].astype(jnp.float32)
    return flat


def abstract_state_and_shardings(init_fn, rng, mesh):
    """(abstract train state, its NamedShardings by the logical rules); ConfigError if a dimension
    does not divide over its mesh axes. Nothing is computed."""
    with sharding.use_mesh(mesh):
        boxed_state = jax.eval_shape(init_fn, rng)
    state_shardings = sharding.logical_shardings(boxed_state, mesh)
    abstract_state = nn.meta.unbox(boxed_state)
    sharding.check_divisible(abstract_state, state_shardings)
    return abstract_state, state_shardings


def _depth(name: str) -> int:
    """The trailing integer of a per-depth loss name ("exit_loss_12" -> 12)."""
    return int(name.rsplit("_", 1)[1])


def train_step(state: TrainState, batch, teacher=None, *, schedule, accumulate: int = 1, ema_decay: float = 0.0,
               objective: losses.Objective = losses.Objective(), teacher_apply=None, with_monitors: bool = False,
               mtp_weight=None, preference_config: preference.PreferenceConfig = preference.PreferenceConfig(),
               grpo_config: grpo.GRPOConfig = grpo.GRPOConfig()):
    """One optimizer step on loss = the objective (masked cross-entropy, with `objective`'s label smoothing,
    z-loss and distillation from `teacher`'s variables through `teacher_apply`) + the sown auxiliary losses;
    the model's other collections take the values the forward pass wrote; sown metrics and probe cotangents
    are logged.

    Gradient accumulation (`accumulate` = k > 1): the batch splits into k micro-batches (rows i, i + k, ...,
    so each spreads over every batch shard) run one after another; micro-batch i's loss is its masked sum
    over the whole batch's token count, so the k gradients add up to the full batch's exactly. State the
    forward pass writes (MoE router biases) is written by each micro-batch in turn. Each micro-batch draws
    its dropout from fold_in(rng, step) (and its index), so a resumed run repeats the same masks.

    With `ema_decay` = d > 0 the moving average of the weights follows: ema <- d ema + (1 - d) params (new).
    With `with_monitors`, the step also logs experiments/monitors.py's statistics (and the model's sown ones).
    A model with MTP modules adds mtp_weight(step) / D * sum_k CE_k (experiments/losses.py) and logs each CE_k; one
    with early exits trains on the depth-weighted CE of its exits and output, and logs each exit's CE.
    With `preference_config.kind` the batch holds chosen and rejected rows and the objective is
    experiments/preference.py's, the reference model's variables passed as `teacher`. With
    `grpo_config.group_size` the batch is a rollout (experiments/grpo.py) and the objective GRPO's."""
    probes = state.model_state.get(models.PROBES, {})
    model_state = {k: v for k, v in state.model_state.items() if k != models.PROBES}
    count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    rng = jax.random.fold_in(state.rng, state.step)
    plain = objective == losses.Objective()
    paired = bool(preference_config.kind)
    rl = bool(grpo_config.group_size)

    def loss_fn(params, probes, model_state, micro, micro_rng):
        inputs = preference.both(micro, "inputs") if paired else micro["inputs"]
        logits, written = state.apply_fn(
            {"params": params, **model_state, models.PROBES: probes}, inputs,
            rngs={"dropout": micro_rng},
            mutable=[*model_state, *models.SOWN, *([models.MONITORS] if with_monitors else [])])
        if (paired or rl) and teacher is not None:  # the frozen reference
            ref_logits = jax.lax.stop_gradient(teacher_apply(teacher, inputs))
        else:
            ref_logits = None
        if paired:
            pair_loss, pair_metrics = preference.objective(preference_config, logits, ref_logits, micro)
            logits = logits[:len(micro["inputs"])]  # the chosen rows: their CE is logged as `loss`
        if rl:
            rl_loss, rl_metrics = grpo.objective(grpo_config, logits, ref_logits, micro)
        sums = losses.masked_sums(logits, micro["targets"], micro["loss_mask"])
        if not plain:
            teacher_logits = teacher_apply(teacher, micro["inputs"]) if objective.distill_weight else None
            sums = {**sums, **objective.sums(logits, micro["targets"], micro["loss_mask"], teacher_logits)}
        aux_loss = (sum(jnp.sum(x) for x in jax.tree.leaves(written["losses"])) / accumulate
                    if "losses" in written else None)  # None: the model sows no auxiliary loss
        total = sums["loss" if plain else "objective"] / count
        if paired:  # each micro-batch's mean, so the accumulated gradient is the batch's mean
            total = pair_loss / accumulate + preference_config.sft_weight * total
            sums = {**sums, **{f"preference/{k}": v / accumulate for k, v in pair_metrics.items()}}
        if rl:  # the sampled completions' CE is logged as `loss`; the objective is GRPO's alone
            total = rl_loss
            sums = {**sums, **{f"grpo/{k}": v for k, v in rl_metrics.items()}}
        if models.MTP in written:  # counts over the whole batch: accumulated micro-batches add up exactly
            depth_sums = losses.mtp_sums(written[models.MTP]["logits"], micro["targets"], micro["loss_mask"])
            counts = losses.mtp_counts(batch["loss_mask"], len(depth_sums))
            total += mtp_weight(state.step) * sum(depth_sums[k] / counts[k] for k in counts) / len(counts)
            sums = {**sums, **depth_sums}
        if models.EXITS in written:  # early exits: the depth-weighted CE of every exit and the final logits
            exit_sums = losses.exit_sums(written[models.EXITS]["logits"], micro["targets"], micro["loss_mask"])
            total = losses.exit_weighted(total, [exit_sums[k] / count for k in sorted(exit_sums, key=_depth)])
            sums = {**sums, **exit_sums}
        return total + (0.0 if aux_loss is None else aux_loss), (sums, aux_loss, written)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def micro_step(model_state, micro, micro_rng):
        (_, (sums, aux_loss, written)), grads = grad_fn(state.params, probes, model_state, micro, micro_rng)
        sown = {"metrics": written.get("metrics", {}), "monitors": written.get(models.MONITORS, {})}
        return {k: written[k] for k in model_state}, grads, (sums, aux_loss, sown)

    if accumulate == 1:
        written_state, (grads, probe_grads), (sums, aux_loss, sown) = micro_step(model_state, batch, rng)
    else:
        micro_batches = jax.tree.map(lambda x: x.reshape(-1, accumulate, *x.shape[1:]).swapaxes(0, 1), batch)

        def scan_body(carry, micro_and_index):
            written_state, summed = carry
            micro, index = micro_and_index
            written_state, grads, outputs = micro_step(written_state, micro, jax.random.fold_in(rng, index))
            return (written_state, jax.tree.map(jnp.add, summed, grads)), outputs

        zeros = jax.tree.map(jnp.zeros_like, (state.params, probes))
        (written_state, (grads, probe_grads)), stacked = jax.lax.scan(
            scan_body, (model_state, zeros), (micro_batches, jnp.arange(accumulate)))
        sums = jax.tree.map(jnp.sum, stacked[0])
        aux_loss = None if stacked[1] is None else jnp.sum(stacked[1])
        sown = jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked[2])
    extra_terms = {k: sums[k] / count for k in ("distill_kl", "log_z_squared") if k in sums}
    extra_terms.update({k: v for k, v in sums.items() if k.startswith(("preference/", "grpo/"))})
    depth_counts = losses.mtp_counts(batch["loss_mask"], sum(k.startswith("mtp_loss_") for k in sums))
    extra_terms.update({k.replace("mtp_loss_", "mtp_loss/"): sums[k] / depth_counts[k] for k in depth_counts})
    extra_terms.update({k.replace("exit_loss_", "exit_loss/"): v / count for k, v in sums.items() if k.startswith("exit_loss_")})
    metrics = {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count, **extra_terms,
               **({} if aux_loss is None else {"aux_loss": aux_loss}),
               "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
               "stage": state.stage, **_flat_metrics(sown["metrics"]), **_flat_metrics(probe_grads),
               **_flat_metrics(sown["monitors"], prefix="monitor/")}
    new_model_state = {**written_state, **({models.PROBES: probes} if probes else {})}
    new_state = state.apply_gradients(grads=grads, model_state=new_model_state)
    if with_monitors:
        metrics.update(monitors.parameter_monitors(state.params, new_state.params, grads))
    if ema_decay:
        new_state = new_state.replace(ema_params=jax.tree.map(
            lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.ema_params, new_state.params))
    return new_state, metrics


def _eval_step(state: TrainState, batch, ema: bool = False):
    """Masked sums at the raw weights (schedule-free: its averaged iterate), or at their moving average."""
    params = state.ema_params if ema else optimizers.evaluation_params(state.opt_state, state.params)
    logits = state.apply_fn({"params": params, **state.model_state}, batch["inputs"])
    return losses.masked_sums(logits, batch["targets"], batch["loss_mask"])


class _SigtermFlag:
    """Set by SIGTERM; the loop then checkpoints and returns."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate(state, eval_step, batches, mesh, chars_per_token=None) -> dict:
    """Exact loss, accuracy and perplexity over every example of an evaluation set; for text also
    bits per character, loss / ln 2 / (characters per token)."""
    totals = None
    for batch in batches:
        sums = eval_step(state, sharding.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    loss = float(totals["loss"]) / count
    result = {"loss": loss, "accuracy": float(totals["correct"]) / count, "perplexity": float(np.exp(min(loss, 80.0)))}
    if chars_per_token:
        result["bits_per_char"] = loss / np.log(2.0) / chars_per_token
    return result


def _check_finite(window, last_good_step, rollbacks: int):
    for step, metrics in window:
        loss = (metrics["loss"] + metrics.get("aux_loss", 0.0) + metrics.get("preference/loss", 0.0)
                + metrics.get("grpo/loss", 0.0))  # the objective's
        # terms (an SAE's: all aux_loss)
        if not np.isfinite(loss):
            after = f" after {rollbacks} rollbacks" if rollbacks else ""
            raise NonFiniteLossError(
                f"loss is {loss} at step {step}{after}; stopping. The last good checkpoint is step "
                f"{last_good_step} (lower optimizer.lr, set optimizer.grad_clip or train.nan_rollbacks, then rerun "
                "to resume)", step)


def roll_back(ckpt: checkpointing.Checkpoints, bad_step: int, data_skipped: int, abstract_state, data_iterator,
              fresh_state, skipped_sharding):
    """PaLM's remedy for a loss spike: the last good state (the initial one if nothing was saved yet), with the
    data moved past every batch up to the one of `bad_step` (which ran with `data_skipped` batches skipped
    before it); returns (state, batches skipped now)."""
    ckpt.finish_pending()
    if ckpt.latest_good is None:
        state = fresh_state()
    else:
        state = ckpt.restore(ckpt.latest_good, abstract_state, data_iterator)
    next_index = bad_step + data_skipped  # step s trains on batch s - 1 + data_skipped
    skipped_before = int(state.data_skipped)
    data_iterator.set_state({**data_iterator.get_state(), "next_index": next_index})
    now_skipped = next_index - int(state.step)
    state = state.replace(data_skipped=jax.device_put(np.int32(now_skipped), skipped_sharding))
    return state, now_skipped - skipped_before


def train_and_evaluate(config, workdir: str, *, devices=None, verbose: bool = True) -> dict:
    """Trains `config` in `workdir` (resuming from its newest good checkpoint); returns the last metrics."""
    devices = list(devices if devices is not None else jax.devices())
    is_lead = jax.process_index() == 0

    def warn(message):
        if is_lead:
            print(message, file=sys.stderr, flush=True)

    # 1. Validate the config, then resolve what the data decides; a workdir resumes only the same run.
    mesh_shape = validation.validate(config, len(devices), jax.process_count())
    splits = datasets.load(config.data, seed=config.seed)
    config = resolve(config, splits)
    validation.validate_resolved(config)
    preference.check_paired(config.train, splits.train, config.data.name)
    prompt_len = grpo.prompt_length(splits.train) if config.train.grpo.group_size else 0  # RL's prompts
    frozen_key = "train.distill.teacher" if config.train.distill.teacher else "train.init_from"  # teacher or reference
    frozen_folder = (config.train.distill.teacher or preference.reference_folder(config.train)
                     or grpo.reference_folder(config.train))
    teacher_config = distill.teacher_config(config, frozen_folder, frozen_key) if frozen_folder else None
    resolved, data_identity = json.loads(json.dumps(config.to_dict())), datasets.identity(config.data, splits)
    run_record.check_resumable(workdir, resolved, data_identity, validation.defaults(config))

    # 2. Set up the mesh.
    mesh = sharding.make_mesh(mesh_shape, devices)
    batch_shards = sharding.batch_shards(mesh)

    # 3. Model, optimizer, and the shardings of the train state (abstract: nothing runs yet).
    model = models.build(config.model)
    schedule = optimizers.learning_rate_schedule(config.optimizer, config.train.steps)
    example_inputs = jax.ShapeDtypeStruct((batch_shards, splits.seq_len), splits.train["inputs"].dtype)
    tx = make_optimizer(config, model, example_inputs)
    ema_decay = config.train.ema_decay
    mtp_weight = losses.mtp_weight_schedule(config.train.mtp_weight, config.train.mtp_weight_late,
                                            config.train.mtp_switch_fraction, config.train.steps)
    preference_config = preference.PreferenceConfig(**config.train.preference.to_dict())
    grpo_config = grpo.GRPOConfig(**config.train.grpo.to_dict())
    objective = losses.Objective(label_smoothing=config.train.label_smoothing, z_loss=config.train.z_loss,
                                 distill_weight=config.train.distill.weight if config.train.distill.teacher else 0.0,
                                 temperature=config.train.distill.temperature)

    lora_config = lora.LoRAConfig(**config.train.lora.to_dict())

    def init_fn(rng):  # boxed with logical names; optimizer statistics that cannot take them replicate
        state = init_state(model, tx, example_inputs, rng, ema=ema_decay > 0, lora_config=lora_config)
        return state.replace(opt_state=sharding.replicate_misfits(state.opt_state, mesh))

    abstract_rng = jax.eval_shape(jax.random.PRNGKey, config.seed)
    abstract_state, state_shardings = abstract_state_and_shardings(init_fn, abstract_rng, mesh)
    abstract_state = checkpointing.abstract_like(abstract_state, state_shardings)
    warm_variables = None
    if config.train.init_from:
        warm_start.check(config, abstract_state.params)
        if not checkpointing.has_checkpoints(workdir):  # a first start: read the weights it starts from
            warm_variables = warm_start.read(config)

    # A distillation teacher: restored once, sharded like the student.
    teacher_apply, teacher, teacher_shardings = (
        distill.load_teacher(teacher_config, frozen_folder, mesh, splits.seq_len)
        if teacher_config else (None, None, None))

    os.makedirs(workdir, exist_ok=True)
    if is_lead:
        run_record.record(workdir, resolved, data_identity)

    # Data: this process's slice of every global batch.
    micro_batches = config.train.grad_accum_steps
    train_batch = batch_size(config.data.batch_size, len(splits.train["inputs"]), batch_shards * micro_batches)
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if splits.stages:
        train_data, stage_starts = pipeline.staged(splits.stages, epochs_per_stage=splits.epochs_per_stage,
                                                   batch_size=train_batch, seed=config.seed, **process)
    else:
        train_data, stage_starts = pipeline.batched(splits.train, batch_size=train_batch, seed=config.seed,
                                                    drop_remainder=config.data.batch_size != -1, **process), [0]
    train_iter = pipeline.iterator(train_data)

    def eval_batches(examples):
        size = batch_size(config.data.eval_batch_size, len(examples["inputs"]), batch_shards)
        return pipeline.batched(examples, batch_size=size, seed=0, shuffle=False, num_epochs=1,
                                drop_remainder=False, **process)

    # 4. Restore the newest good checkpoint, or initialise: the run's first computations.
    with sharding.use_mesh(mesh):
        compiled_init = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=state_shardings)
        state = checkpointing.restore_latest(workdir, abstract_state, train_iter, warn=warn)
        rng = jax.random.PRNGKey(config.seed)
        resumed = state is not None
        if not resumed:
            state = compiled_init(rng)
            if warm_variables is not None:  # another run's weights, this run's fresh optimizer
                params, model_state = warm_start.place(warm_variables, state_shardings, mesh, state.params)
                state = state.replace(params=params, model_state={**state.model_state, **model_state})
                if ema_decay > 0:  # its own buffers: the step donates both trees
                    state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))
        ckpt = checkpointing.Checkpoints(workdir, config.train.keep_checkpoints,
                                         latest_good=int(state.step) if resumed else None)

        # 5. Compile the steps: state donated and kept in its shardings, batches split over (data, fsdp).
        batch_spec = sharding.batch_sharding(mesh)
        compiled_train_step = jax.jit(functools.partial(train_step, schedule=schedule, accumulate=micro_batches,
                                                        ema_decay=ema_decay, objective=objective,
                                                        teacher_apply=teacher_apply, with_monitors=config.train.monitors,
                                                        mtp_weight=mtp_weight,
                                                        preference_config=preference_config,
                                                        grpo_config=grpo_config),
                                      donate_argnums=0,
                                      in_shardings=(state_shardings, batch_spec, teacher_shardings),
                                      out_shardings=(state_shardings, sharding.replicated(mesh)))
        compiled_eval_step = jax.jit(_eval_step, in_shardings=(state_shardings, batch_spec),
                                     out_shardings=sharding.replicated(mesh))
        compiled_eval_ema = jax.jit(functools.partial(_eval_step, ema=True), in_shardings=(state_shardings, batch_spec),
                                    out_shardings=sharding.replicated(mesh))
        compiled_rollout = None
        if grpo_config.group_size:  # RL: each batch's prompts continued by the current policy, then scored
            rollout = functools.partial(grpo.rollout, model, config=grpo_config, prompt_len=prompt_len)

            def rollout_step(state, batch):
                params = lora.merged(state.params, lora_config.alpha) if lora_config.rank else state.params
                model_state = {k: v for k, v in state.model_state.items() if k != models.PROBES}
                rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
                if grpo_config.seed:
                    rng = jax.random.fold_in(rng, grpo_config.seed)
                return rollout({"params": params, **model_state}, batch, rng)

            compiled_rollout = jax.jit(rollout_step, in_shardings=(state_shardings, batch_spec), out_shardings=batch_spec)
            compiled_minibatch = jax.jit(functools.partial(grpo.minibatch, count=grpo_config.minibatches),
                                         static_argnums=1, in_shardings=(batch_spec,), out_shardings=batch_spec)
        compiled_begin_stage = jax.jit(functools.partial(begin_stage, tx=tx), static_argnums=1, donate_argnums=0,
                                       out_shardings=state_shardings)

        # 6. Loop.
        writer = metrics_writer.MetricsWriter(workdir, enabled=is_lead)
        step = first_step = int(state.step)
        progress = metrics_writer.Progress(config.train.steps, first_step, enabled=verbose and is_lead)
        if resumed:
            progress.message(f"resumed from step {first_step} in {workdir}")
        stage, data_skipped, rollbacks = int(state.stage), int(state.data_skipped), 0
        pending, window, last, rollout_batch = [], [], {}, None
        tokens_per_step = train_batch * splits.seq_len
        window_start = loop_start = time.perf_counter()

        def sync():
            """Fetches the pending train metrics; raises if any step's loss is not finite."""
            fetched = jax.device_get(pending)
            pending.clear()
            steps = range(step - len(fetched) + 1, step + 1)
            window.extend(zip(steps, fetched))
            _check_finite(window[-len(fetched):], ckpt.last_saved, rollbacks)

        try:
            with _SigtermFlag() as sigterm:
                while step < config.train.steps and not sigterm.raised:
                    data_stage = pipeline.stage_of(stage_starts, step + data_skipped)
                    if data_stage != stage:
                        stage = data_stage
                        state = compiled_begin_stage(state, stage)
                        progress.message(f"curriculum stage {stage} from step {step}: optimizer state reset")
                    batch = sharding.global_batch(next(train_iter), mesh)
                    if compiled_rollout is not None:  # a rollout every epochs * minibatches steps (batches unused)
                        steps_per_rollout = grpo_config.epochs * grpo_config.minibatches
                        if rollout_batch is None or step % steps_per_rollout == 0:
                            rollout_batch = compiled_rollout(state, batch)
                        batch = (rollout_batch if grpo_config.minibatches == 1 else
                                 compiled_minibatch(rollout_batch, step % grpo_config.minibatches))
                    with jax.transfer_guard("disallow"):
                        state, metrics = compiled_train_step(state, batch, teacher)
                    pending.append(metrics)
                    step += 1
                    final = step == config.train.steps
                    do_log = step % config.train.log_every == 0 or final
                    do_eval = (config.train.eval_every and step % config.train.eval_every == 0) or final
                    do_save = step % config.train.checkpoint_every == 0 or final
                    if do_log or do_save:
                        try:
                            sync()
                        except NonFiniteLossError as error:
                            if rollbacks == config.train.nan_rollbacks:
                                raise
                            rollbacks += 1
                            state, skipped = roll_back(ckpt, error.step, data_skipped, abstract_state, train_iter,
                                                       lambda: compiled_init(rng), state_shardings.data_skipped)
                            step, stage, data_skipped = int(state.step), int(state.stage), int(state.data_skipped)
                            window.clear()
                            rollout_batch = None
                            writer.write(step, "rollback", {"bad_step": error.step, "skipped_batches": skipped,
                                                            "rollback": rollbacks})
                            warn(f"warning: {error.args[0].split(';')[0]}: rolled back to step {step} and skipped "
                                 f"{skipped} batches (rollback {rollbacks} of {config.train.nan_rollbacks})")
                            continue
                    if do_log:
                        seconds = time.perf_counter() - window_start
                        mean = {k: float(np.mean([m[k] for _, m in window])) for k in window[-1][1]}
                        last["train"] = {**mean, "tokens_per_s": tokens_per_step * len(window) / seconds,
                                         "wall_s": time.perf_counter() - loop_start}
                        writer.write(step, "train", last["train"])
                        window.clear()
                        window_start = time.perf_counter()
                    if do_eval:
                        for name, examples in splits.evals.items():
                            last[name] = evaluate(state, compiled_eval_step, eval_batches(examples), mesh,
                                                  splits.chars_per_token)
                            writer.write(step, name, last[name])
                            if ema_decay:  # the moving average of the weights, beside the raw ones
                                last[f"{name}_ema"] = evaluate(state, compiled_eval_ema, eval_batches(examples), mesh,
                                                               splits.chars_per_token)
                                writer.write(step, f"{name}_ema", last[f"{name}_ema"])
                    if do_log:
                        shown = {"loss": last["train"]["loss"], "acc": last["train"]["accuracy"]}
                        evals = "  ".join(f"{n} loss {m['loss']:.4g} acc {m['accuracy']:.4g}"
                                          for n, m in last.items() if n != "train")
                        progress.update(step, shown, evals)
                    if do_save:
                        ckpt.save(step, state, train_iter)
                if sigterm.raised:  # the signal may arrive anywhere in the loop body: save here, once
                    if ckpt.last_saved != step:
                        sync()
                        ckpt.save(step, state, train_iter)
                    progress.message(f"SIGTERM: saved a checkpoint at step {step}; rerun to resume")
        finally:
            ckpt.close()
            writer.close()
    if is_lead and step > first_step:
        plots.plot_curves(workdir, getattr(model, "plot_keys", ("loss", "accuracy")), log_x=config.train.plot_log_x)
        if config.train.monitors:
            plots.plot_monitors(workdir, log_x=config.train.plot_log_x)
    return {"step": step, **last}
