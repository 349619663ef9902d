"""Losses a model sows during its forward pass, added to whatever objective trains it, by collection
(models/__init__.py names them), in this order:

    mtp     multi-token prediction (models/mtp.py): + w(step) / D sum_k CE_k, each depth's mean over the positions
            it scores; w from `train.mtp_weight` / `mtp_weight_late` / `mtp_switch_fraction`; logged as mtp_loss/k
    exits   early exits (models/early_exit.py): the objective becomes the depth-weighted sum of the exits' mean CEs
            and itself, w_j = j / sum_i i (experiments/losses.exit_weighted); logged as exit_loss/j
    losses  auxiliary terms (MoE balance, MoD / MoR routers, an SAE's whole loss): summed, each micro-batch's share
            1 / accumulate; logged as aux_loss

Each term's sums add up over micro-batches; its counts are the whole batch's, so an accumulated step equals the
full batch's.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

import models
from experiments import losses


def _mtp(total, sums, sown, micro, batch, count, accumulate, weight):
    depth_sums = losses.mtp_sums(sown["logits"], micro["targets"], micro["loss_mask"])
    counts = losses.mtp_counts(batch["loss_mask"], len(depth_sums))
    total += weight * sum(depth_sums[k] / counts[k] for k in counts) / len(counts)
    return total, {**sums, **depth_sums}


def _mtp_metrics(sums, batch, count):
    counts = losses.mtp_counts(batch["loss_mask"], sum(k.startswith("mtp_loss_") for k in sums))
    return {k.replace("mtp_loss_", "mtp_loss/"): sums[k] / counts[k] for k in counts}


def _depth(name: str) -> int:
    """The trailing integer of a per-depth loss name ("exit_loss_12" -> 12)."""
    return int(name.rsplit("_", 1)[1])


def _exits(total, sums, sown, micro, batch, count, accumulate, weight):
    exit_sums = losses.exit_sums(sown["logits"], micro["targets"], micro["loss_mask"])
    total = losses.exit_weighted(total, [exit_sums[k] / count for k in sorted(exit_sums, key=_depth)])
    return total, {**sums, **exit_sums}


def _exit_metrics(sums, batch, count):
    return {k.replace("exit_loss_", "exit_loss/"): v / count for k, v in sums.items() if k.startswith("exit_loss_")}


def _auxiliary(total, sums, sown, micro, batch, count, accumulate, weight):
    aux_loss = sum(jnp.sum(x) for x in jax.tree.leaves(sown)) / accumulate
    return total + aux_loss, {**sums, "aux_loss": aux_loss}


def _auxiliary_metrics(sums, batch, count):
    return {"aux_loss": sums["aux_loss"]} if "aux_loss" in sums else {}


# collection -> (add its loss to the objective's, its logged metrics)
TERMS = {models.MTP: (_mtp, _mtp_metrics), models.EXITS: (_exits, _exit_metrics),
         "losses": (_auxiliary, _auxiliary_metrics)}


@dataclasses.dataclass(frozen=True)
class SownLosses:
    """The sown terms with their weights from `config.train`."""

    mtp_weight: Callable = losses.mtp_weight_schedule(0.3, 0.1, 1.0, 1)  # step -> w

    @classmethod
    def from_config(cls, train) -> "SownLosses":
        return cls(losses.mtp_weight_schedule(train.mtp_weight, train.mtp_weight_late, train.mtp_switch_fraction,
                                              train.steps))

    def add(self, total, sums: dict, written: dict, micro: dict, batch: dict, count, accumulate: int, step):
        """(the objective with every sown term of `written` added, the sums with theirs)."""
        weights = {models.MTP: self.mtp_weight(step)}
        for collection, (add, _) in TERMS.items():
            if collection in written:
                total, sums = add(total, sums, written[collection], micro, batch, count, accumulate,
                                  weights.get(collection))
        return total, sums

    def metrics(self, sums: dict, batch: dict, count) -> dict:
        return {k: v for _, metrics in TERMS.values() for k, v in metrics(sums, batch, count).items()}
