"""Language modelling (`train.objective = "lm"`, the default): the masked cross-entropy of the targets, with
label smoothing (`train.label_smoothing` = eps: targets (1 - eps) onehot + eps / V) and PaLM's z-loss
(`train.z_loss` = c: + c log^2 Z per token):

    objective = sum over masked tokens of [CE(smoothed targets, logits) + c log^2 Z] / tokens

The logged `loss` stays the plain cross-entropy (so runs with and without the extra terms compare); the terms'
own means are logged as `log_z_squared` (and distillation's `distill_kl`).

This class is also the base of every other objective (experiments/objectives/__init__.py): the hooks below are
what an objective may change, each with the language-modelling behaviour as its default.
"""

import dataclasses

from experiments import losses


class Unchanged:
    """The batch preparation of an objective that trains on the data's batches as they are."""

    def __call__(self, state, batch, step: int):
        return batch

    def reset(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class LanguageModelling:
    terms: losses.Objective = losses.Objective()  # the per-token terms beyond cross-entropy
    frozen_folder: str = ""  # the run whose model the objective reads beside the policy ("": none)
    frozen_key: str = ""  # the config key that names it, for messages
    selecting_key = ""  # the key whose value selects the objective when train.objective is ""
    section = ""  # its keys' section of config.train ("": none), declared by `keys`, a dataclass instance
    keys = None
    policy_dropout = True  # whether the policy's pass applies the model's (and LoRA's) dropout (GRPO: no)

    @classmethod
    def selected_by(cls, train) -> bool:
        """Whether `train`'s keys ask for this objective when `train.objective` is "": its `selecting_key` is set
        (language modelling has none: the objective when no other is asked for)."""
        if not cls.selecting_key:
            return False
        node = train
        for part in cls.selecting_key.removeprefix("train.").split("."):
            node = node[part]
        return bool(node)

    @staticmethod
    def problems(config) -> list[str]:
        """The config rules of this objective's keys, one line each, checked before anything runs."""
        return []

    @classmethod
    def from_config(cls, config) -> "LanguageModelling":
        return cls(terms=terms(config.train))

    def check_data(self, config, examples: dict) -> None:
        """Raises ConfigError when the training examples lack what the objective reads."""

    def batch_preparer(self, **context):
        """What turns the data's batch into the step's (GRPO: rollouts); `context` holds the trainer's model,
        config, splits, mesh shardings and LoRA config."""
        return Unchanged()

    def inputs(self, batch):
        """The tokens the policy (and the frozen model) read: [B, L]."""
        return batch["inputs"]

    def dropout_rngs(self, rng) -> dict:
        """The policy pass's rngs: a "dropout" stream where the objective trains with dropout, none otherwise
        (models/layers.dropout is then the identity)."""
        return {"dropout": rng} if self.policy_dropout else {}

    def loss(self, logits, batch: dict, count, accumulate: int, frozen_logits=None):
        """(the micro-batch's share of the objective, its sums): the sums are added over micro-batches, and
        `count` is the whole batch's number of scored tokens. `frozen_logits(tokens)` runs the frozen model."""
        sums = losses.masked_sums(logits, batch["targets"], batch["loss_mask"])
        if self.terms == losses.Objective():
            return sums["loss"] / count, sums
        teacher_logits = frozen_logits(batch["inputs"]) if self.terms.distill_weight else None
        sums = {**sums, **self.terms.sums(logits, batch["targets"], batch["loss_mask"], teacher_logits)}
        return sums["objective"] / count, sums

    def metrics(self, sums: dict, count) -> dict:
        """The objective's logged terms from the step's sums, beside `loss` and `accuracy`."""
        return {k: sums[k] / count for k in ("distill_kl", "log_z_squared") if k in sums}


def terms(train, **more) -> losses.Objective:
    return losses.Objective(label_smoothing=train.label_smoothing, z_loss=train.z_loss, **more)
