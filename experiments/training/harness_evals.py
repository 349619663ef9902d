"""lm-evaluation-harness tasks during training (`config.train.evals`), logged as metrics.

    --config.train.evals.tasks=shakespeare_next_line,shakespeare_rolling --config.train.evals.every=500 \
        [--config.train.evals.limit=N] [--config.train.evals.num_fewshot=K] [--config.train.evals.include_path=DIR]

Every `every` steps (and at the last step) the weights the run evaluates (schedule-free's average, LoRA adapters
merged) are scored in place on the trainer's mesh through the `beyond` backend
(experiments/training/harness_backend.py) and `lm_eval.simple_evaluate`; each task's metrics go to metrics.jsonl as a
"harness" event (`shakespeare_next_line/acc`, ...) and to TensorBoard. Needs the `[eval]` extra; a run that names
tasks without it, or that is not a text language model, stops before anything compiles (harness_keys.py).
"""

from experiments.training.harness_keys import SHIPPED_TASKS, task_manager, task_names


class HarnessEvals:
    """`due(step, final)` and `__call__(state) -> {task/metric: value}`; inert when no task is named."""

    def __init__(self, config, mesh):
        import jax

        from data.config_fields import ConfigError

        self.config, self.mesh, self.keys = config, mesh, config.train.evals
        self.tasks = task_names(self.keys)
        if self.tasks and jax.process_count() > 1:
            raise ConfigError(f"train.evals.tasks in a {jax.process_count()}-process job: the harness feeds batches "
                              "from one process (for now); evaluate the run afterwards with experiments.lm_eval")
        self._manager = None

    def due(self, step: int, final: bool) -> bool:
        return bool(self.tasks) and (final or bool(self.keys.every and step % self.keys.every == 0))

    def __call__(self, state) -> dict[str, float]:
        import lm_eval

        import models
        from experiments.optim import optimizers
        from experiments.posttrain import lora
        from experiments.training import harness_backend

        if self._manager is None:
            paths = [SHIPPED_TASKS] + ([self.keys.include_path] if self.keys.include_path else [])
            self._manager = task_manager(self.tasks, paths)
        params = lora.merged(optimizers.evaluation_params(state.opt_state, state.params), self.config.train.lora.alpha)
        variables = {"params": params, **state.model_state}
        model = harness_backend.BeyondLM.in_memory(self.config, models.build(self.config.model).apply, variables, self.mesh,
                                           batch_size=self.keys.batch_size)
        results = lm_eval.simple_evaluate(
            model=model, tasks=self.tasks, limit=self.keys.limit or None, task_manager=self._manager,
            num_fewshot=None if self.keys.num_fewshot < 0 else self.keys.num_fewshot, log_samples=False,
            bootstrap_iters=0, verbosity="ERROR")["results"]
        return {f"{task}/{name.split(',')[0]}": float(value) for task, metrics in results.items()
                for name, value in metrics.items() if isinstance(value, (int, float)) and "stderr" not in name}
