"""Everything above the models: the commands, the one training loop, and what is built around it.

    train.py, sample.py, restore.py, import_hf.py, export_hf.py, lm_eval.py, compress.py, losses.py
                  the commands and public functions named in docs/interfaces.md (their names are stable)
    configs/      one config file per experiment; base.py holds the typed sections every config shares
    training/     the loop and its infrastructure: trainer, train state, checkpoints, sharding, validation,
                  the command-line runner, metrics, monitors, warm starts, plots
    objectives/   what a train step minimises (language modelling, distillation, preferences, GRPO), by table
    optim/        optimizers by name and what composes around them (Shampoo, Grokfast)
    posttrain/    LoRA adapters and model merging
    compression/  quantization and pruning of a trained model's kernels, layer by layer (GPTQ, SparseGPT, ...)
    test_time/    spending inference on a problem: verifiers (ORM, PRM), best-of-N, voting, beam search, MCTS
    analysis/     interpretability on a finished run: activations, stores, lens, probes, patching, steering, SAEs
    evaluation/   evaluations of a run (its own evaluation sets' loss, length generalisation, reasoning accuracy,
                  lm-evaluation-harness tasks)
    studies/      what studies and benchmarks share (run_or_reuse, median_seconds), scaling fits, vmapped sweeps

A module that moved into a sub-package answers its old name in one line with the new one (`MOVED`), so an old
command line (`python -m experiments.probes ...`) or import says where to go instead of failing obscurely.
"""

import importlib.abc
import sys

MOVED = {
    **{name: f"training.{name}" for name in ("trainer", "train_state", "checkpointing", "sharding", "cli",
                                              "validation", "metrics_writer", "run_record", "monitors",
                                              "warm_start", "plots")},
    **{name: f"optim.{name}" for name in ("optimizers", "shampoo", "grokfast")},
    **{name: f"posttrain.{name}" for name in ("lora", "merge")},
    **{name: f"analysis.{name}" for name in ("activations", "activation_store", "attention_plot", "logit_lens",
                                              "patching", "probes", "steering", "sae_dashboard", "sae_eval",
                                              "progress_measures", "latent_search")},
    **{name: f"evaluation.{name}" for name in ("length_eval", "reasoning_eval")},
    **{name: f"studies.{name}" for name in ("scaling", "scaling_fits", "vmap_sweep")},
}


class _MovedModules(importlib.abc.MetaPathFinder):
    """Consulted last: an old module name is a one-line ModuleNotFoundError naming its new place."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in MOVED:
            new = f"{__name__}.{MOVED[name]}"
            raise ModuleNotFoundError(f"{fullname} moved to {new}: run `python -m {new}`, or import "
                                      f"`from {new.rpartition('.')[0]} import {name}`", name=fullname)
        return None


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())

from data import command_check as _command_check  # noqa: E402

_command_check.refuse_library_module(__name__, __path__[0])  # `python -m` on a module that is not a command
