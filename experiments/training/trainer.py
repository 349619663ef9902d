"""The one training loop every experiment runs.

    1. resolve and validate the config (before anything compiles)
    2. set up the mesh
    3. build data, model, objective (experiments/objectives/: what the step minimises, its frozen model and
       its batch preparation), optimizer, and the shardings of the train state
    4. restore the newest good checkpoint (damaged ones are reported and set aside), or initialise
    5. compile the train and eval steps
    6. loop: step, log, evaluate, checkpoint; stop cleanly on SIGTERM; on a non-finite loss roll back to
       the last good checkpoint past the batches that diverged (`train.nan_rollbacks` times), then stop loudly

With a curriculum (data whose `Splits.stages` are set, e.g. Coconut's), each stage's first step resets
the optimizer state; the stage is part of the train state, so a resumed run continues in its stage.

Train metrics are fetched from the device only every `log_every` steps (and before each checkpoint),
so dispatch runs ahead of the host; every step's loss is still checked before a checkpoint is written.

A resumed workdir must hold the same run: the config and the data's identity are recorded on the first
start and checked on every later one (experiments/training/run_record.py).
"""

import functools
import json
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import data as datasets
import models
from data import pipeline
from experiments import losses, objectives
from experiments.optim import optimizers
from experiments.posttrain import lora
from experiments.training import (checkpointing, harness_evals, metrics_writer, monitors, plots, run_record,
                                  sharding, throughput, validation, wandb_run, warm_start)
from experiments.objectives import frozen as frozen_models, language_modelling, sown as sown_losses
from experiments.training.train_state import (TrainState, abstract_state_and_shardings, begin_stage, init_state,
                                     make_optimizer)


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


def packed_rows(batch) -> dict:
    """The model's keyword arguments for a batch of packed rows (`segment_ids`, `positions`: data.packing,
    models/packing.py), or none for one document per row."""
    return {k: batch[k] for k in ("segment_ids", "positions") if k in batch}


def padding_fraction(batch) -> dict:
    """{"padding_fraction": the share of a packed batch's positions that hold no document}, or {}."""
    if "segment_ids" not in batch:
        return {}
    return {"padding_fraction": jnp.mean((batch["segment_ids"] == 0).astype(jnp.float32))}  # exact 0, never -3e-8


def train_step(state: TrainState, batch, frozen=None, *, schedule, accumulate: int = 1, ema_decay: float = 0.0,
               objective: language_modelling.LanguageModelling = language_modelling.LanguageModelling(),
               frozen_apply=None, sown: sown_losses.SownLosses = sown_losses.SownLosses(),
               with_monitors: bool = False):
    """One optimizer step on `objective` (experiments/objectives/: its loss on the model's logits, reading the
    frozen model's logits through `frozen_apply(frozen, tokens)` where it has one) + the losses the model sows
    (`sown`, by collection); the model's other collections take the values the forward pass wrote; sown metrics
    and probe cotangents are logged, and `objective`, the value minimised.

    Gradient accumulation (`accumulate` = k > 1): the batch splits into k micro-batches (rows i, i + k, ...,
    so each spreads over every batch shard) run one after another; micro-batch i's loss is its masked sum
    over the whole batch's token count, so the k gradients add up to the full batch's exactly. State the
    forward pass writes (MoE router biases) is written by each micro-batch in turn. Each micro-batch draws
    its dropout from fold_in(rng, step) (and its index), so a resumed run repeats the same masks.

    With `ema_decay` = d > 0 the moving average of the weights follows: ema <- d ema + (1 - d) params (new).
    With `with_monitors`, the step also logs experiments/training/monitors.py's statistics (and the model's sown ones)."""
    probes = state.model_state.get(models.PROBES, {})
    model_state = {k: v for k, v in state.model_state.items() if k != models.PROBES}
    count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    rng = jax.random.fold_in(state.rng, state.step)
    frozen_logits = None if frozen is None else (lambda tokens: jax.lax.stop_gradient(frozen_apply(frozen, tokens)))

    def loss_fn(params, probes, model_state, micro, micro_rng):
        logits, written = state.apply_fn(
            {"params": params, **model_state, models.PROBES: probes}, objective.inputs(micro), **packed_rows(micro),
            rngs=objective.dropout_rngs(micro_rng),
            mutable=[*model_state, *models.SOWN, *([models.MONITORS] if with_monitors else [])])
        total, sums = objective.loss(logits, micro, count, accumulate, frozen_logits)
        total, sums = sown.add(total, sums, written, micro, batch, count, accumulate, state.step)
        return total, (sums, written)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def micro_step(model_state, micro, micro_rng):
        (total, (sums, written)), grads = grad_fn(state.params, probes, model_state, micro, micro_rng)
        sown_stats = {"metrics": written.get("metrics", {}), "monitors": written.get(models.MONITORS, {})}
        # "minimised": the value the step minimised, beside the objective's own sums (label smoothing's "objective")
        return {k: written[k] for k in model_state}, grads, ({**sums, "minimised": total}, sown_stats)

    if accumulate == 1:
        written_state, (grads, probe_grads), (sums, sown_stats) = micro_step(model_state, batch, rng)
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
        sown_stats = jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked[1])
    metrics = {"loss": sums["loss"] / count, "accuracy": sums["correct"] / count, **objective.metrics(sums, count),
               **sown.metrics(sums, batch, count), "objective": sums["minimised"],
               "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
               "stage": state.stage, **padding_fraction(batch), **_flat_metrics(sown_stats["metrics"]),
               **_flat_metrics(probe_grads),
               **_flat_metrics(sown_stats["monitors"], prefix="monitor/")}
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
    logits = state.apply_fn({"params": params, **state.model_state}, batch["inputs"], **packed_rows(batch))
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
    return metrics_from_sums(totals, chars_per_token)


def metrics_from_sums(totals, chars_per_token=None) -> dict:
    """{"loss", "accuracy", "perplexity"[, "bits_per_char"]} of an evaluation set's summed `losses.masked_sums`."""
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    loss = float(totals["loss"]) / count
    result = {"loss": loss, "accuracy": float(totals["correct"]) / count, "perplexity": float(np.exp(min(loss, 80.0)))}
    if chars_per_token:
        result["bits_per_char"] = loss / np.log(2.0) / chars_per_token
    return result


def _check_finite(window, last_good_step, rollbacks: int):
    for step, metrics in window:
        loss = metrics["objective"]  # what the step minimised, whatever the objective and the sown terms
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
    objective = objectives.build(config)  # what the step minimises (experiments/objectives/)
    objective.check_data(config, splits.train)
    frozen_config = (frozen_models.check(config, objective.frozen_folder, objective.frozen_key)
                     if objective.frozen_folder else None)  # a teacher or a reference, checked before it is read
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
    flops_per_token = throughput.model_flops_per_token(config.model, splits.seq_len)  # for the logged MFU
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

    # The objective's frozen model (a teacher or a reference): restored once, sharded like the policy.
    frozen_apply, frozen, frozen_shardings = (
        frozen_models.load(frozen_config, objective.frozen_folder, mesh, splits.seq_len)
        if frozen_config else (None, None, None))

    os.makedirs(workdir, exist_ok=True)
    if is_lead:
        run_record.record(workdir, resolved, data_identity)

    # Data: this process's slice of every global batch.
    micro_batches = config.train.grad_accum_steps
    train_batch = batch_size(config.data.batch_size, len(splits.train["inputs"]), batch_shards * micro_batches)
    process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_data, stage_starts = splits.train_batches(batch_size=train_batch, seed=config.seed,
                                                    drop_remainder=config.data.batch_size != -1, **process)
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
            from_data = {} if warm_variables is not None else model.initial_from_data(model.cfg, splits.train)
            if from_data:  # parameters the training examples decide (an SAE's b_dec)
                placed = {k: jax.device_put(v, state_shardings.params[k]) for k, v in from_data.items()}
                state = state.replace(params={**state.params, **placed})
            if warm_variables is not None:  # another run's weights, this run's fresh optimizer
                params, model_state = warm_start.place(warm_variables, state_shardings, mesh, state.params)
                state = state.replace(params=params, model_state={**state.model_state, **model_state})
            if from_data or warm_variables is not None:  # what starts at the weights starts at the placed ones:
                # the optimizer's copies (schedule-free's z) and the moving average (in buffers of its own: the
                # step donates both trees)
                fresh_optimizer = jax.jit(tx.init, out_shardings=state_shardings.opt_state)
                state = state.replace(opt_state=fresh_optimizer(state.params))
                if ema_decay > 0:
                    state = state.replace(ema_params=jax.tree.map(jnp.copy, state.params))
        ckpt = checkpointing.Checkpoints(workdir, config.train.keep_checkpoints,
                                         latest_good=int(state.step) if resumed else None)

        # 5. Compile the steps: state donated and kept in its shardings, batches split over (data, fsdp).
        batch_spec = sharding.batch_sharding(mesh)
        compiled_train_step = jax.jit(functools.partial(train_step, schedule=schedule, accumulate=micro_batches,
                                                        ema_decay=ema_decay, objective=objective,
                                                        frozen_apply=frozen_apply,
                                                        sown=sown_losses.SownLosses.from_config(config.train),
                                                        with_monitors=config.train.monitors),
                                      donate_argnums=0,
                                      in_shardings=(state_shardings, batch_spec, frozen_shardings),
                                      out_shardings=(state_shardings, sharding.replicated(mesh)))
        compiled_eval_step = jax.jit(_eval_step, in_shardings=(state_shardings, batch_spec),
                                     out_shardings=sharding.replicated(mesh))
        compiled_eval_ema = jax.jit(functools.partial(_eval_step, ema=True), in_shardings=(state_shardings, batch_spec),
                                    out_shardings=sharding.replicated(mesh))
        prepare = objective.batch_preparer(model=model, config=config, splits=splits, lora_config=lora_config,
                                           state_shardings=state_shardings, batch_spec=batch_spec)
        compiled_begin_stage = jax.jit(functools.partial(begin_stage, tx=tx), static_argnums=1, donate_argnums=0,
                                       out_shardings=state_shardings)

        # 6. Loop.
        writer = metrics_writer.MetricsWriter(workdir, enabled=is_lead, tracker=wandb_run.open_run(
            config, workdir, resolved, data_identity) if is_lead else None)  # W&B beside TensorBoard (train.wandb)
        harness = harness_evals.HarnessEvals(config, mesh)  # lm_eval tasks (train.evals); inert without tasks
        step = first_step = int(state.step)
        progress = metrics_writer.Progress(config.train.steps, first_step, enabled=verbose and is_lead)
        if resumed:
            progress.message(f"resumed from step {first_step} in {workdir}")
        stage, data_skipped, rollbacks = int(state.stage), int(state.data_skipped), 0
        pending, window, last = [], [], {}
        tokens_per_step = train_batch * splits.seq_len
        clock = throughput.StepClock(config, workdir, list(mesh.devices.flat), tokens_per_step, flops_per_token)
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
                    with clock.data():
                        batch = prepare(state, sharding.global_batch(next(train_iter), mesh), step)
                    clock.before_step(step + 1)
                    with jax.transfer_guard("disallow"):
                        state, metrics = compiled_train_step(state, batch, frozen)
                    pending.append(metrics)
                    step += 1
                    clock.after_step(step, state)
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
                            prepare.reset()
                            writer.write(step, "rollback", {"bad_step": error.step, "skipped_batches": skipped,
                                                            "rollback": rollbacks})
                            warn(f"warning: {error.args[0].split(';')[0]}: rolled back to step {step} and skipped "
                                 f"{skipped} batches (rollback {rollbacks} of {config.train.nan_rollbacks})")
                            continue
                    if do_log:
                        seconds = time.perf_counter() - window_start
                        mean = {k: float(np.mean([m[k] for _, m in window])) for k in window[-1][1]}
                        last["train"] = {**mean, **clock.window_metrics(len(window), seconds),
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
                    if harness.due(step, final):
                        writer.write(step, "harness", harness(state))
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
            clock.close()
            ckpt.close()
            writer.close()
    if is_lead and step > first_step:
        plots.plot_curves(workdir, getattr(model, "plot_keys", ("loss", "accuracy")), log_x=config.train.plot_log_x)
        if config.train.monitors:
            plots.plot_monitors(workdir, log_x=config.train.plot_log_x)
    return {"step": step, **last}
