"""Preference optimisation (`train.objective = "preference"`, or `train.preference.kind` set): DPO, IPO, KTO,
SimPO, ORPO.

The data gives each example a chosen response and a rejected one to the same prompt (the batch's "inputs",
"targets", "loss_mask" and "rejected_inputs", "rejected_targets", "rejected_loss_mask", e.g. `data.rejected`),
the loss masks marking the response tokens. One forward pass of the policy reads both halves; the frozen
reference model (the run `train.init_from` starts from, restored once and sharded like the policy) reads them
too, inside the step, for the kinds that have one (DPO, IPO, KTO). Per step:

    log pi(y) = sum over response tokens of log p(token)        (experiments/losses.sequence_logps)
    objective = preference_loss(log pi(y_w), log pi(y_l), log pi_ref(y_w), log pi_ref(y_l))     (losses.py)
                + sft_weight * CE(chosen response tokens)                                         (ORPO: 1)

KTO reads a third set of rows, its mismatched pairs (`mismatched`): row i's prompt followed by row i - 1's chosen
response (cyclically in the micro-batch, as TRL builds its KL completions), under the policy and the reference,
for its reference point z. IPO compares per-token log-ratios by default (`ipo_per_token`, TRL's form).

Logged besides the chosen responses' `loss` / `accuracy` (so an SFT run and its preference run compare):
preference/loss, reward_margin, accuracy (of the implicit reward's ranking), chosen / rejected rewards and
log-probabilities, and with a reference kl_ref = the mean over chosen responses of
sum_t KL(pi(. | y_<t) || pi_ref(. | y_<t)), the policy's drift from the reference along them.
"""

import dataclasses

import jax
import jax.numpy as jnp

from data.config_fields import ConfigError, field
from experiments import losses
from experiments.objectives import language_modelling


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """`config.train.preference`: the loss (losses.preference_loss) and its coefficients; kind "" trains as usual."""

    kind: str = field("", choices=("", *losses.PREFERENCE_KINDS))
    beta: float = field(0.1, above=0)  # DPO's beta (IPO: tau; ORPO: lambda; SimPO: its beta, ~2)
    label_smoothing: float = field(0.0, min=0, below=0.5)  # conservative DPO's eps
    gamma: float = field(0.0, min=0)  # SimPO's target margin
    sft_weight: float = field(0.0, min=0)  # + w * CE on the chosen responses (ORPO's NLL term: 1)
    desirable_weight: float = field(1.0, min=0)  # KTO's lambda_D
    undesirable_weight: float = field(1.0, min=0)  # KTO's lambda_U
    ipo_per_token: bool = True  # IPO on log-ratios divided by the response lengths (TRL); False: summed (Azar et al.)


@dataclasses.dataclass(frozen=True)
class Preference(language_modelling.LanguageModelling):
    """The entry of the objectives table: the policy reads each example's chosen and rejected rows in one pass."""

    config: PreferenceConfig = PreferenceConfig()
    selecting_key = "train.preference.kind"
    section, keys = "preference", PreferenceConfig()

    @staticmethod
    def problems(config) -> list[str]:
        kind, init_from = config.train.preference.kind, config.train.init_from
        if not kind:
            return ["train.objective='preference' needs train.preference.kind, one of "
                    f"{list(losses.PREFERENCE_KINDS)}"]
        if kind in losses.NEEDS_REFERENCE and not init_from:
            return [f"train.preference.kind={kind!r} needs a reference model: set train.init_from to the run it "
                    "starts from (e.g. the SFT run)"]
        return []

    @classmethod
    def from_config(cls, config) -> "Preference":
        keys = PreferenceConfig(**config.train.preference.to_dict())
        reference = config.train.init_from if keys.kind in losses.NEEDS_REFERENCE else ""
        return cls(terms=language_modelling.terms(config.train), frozen_folder=reference,
                   frozen_key="train.init_from" if reference else "", config=keys)

    def check_data(self, config, examples: dict) -> None:
        if "rejected_inputs" not in examples:
            raise ConfigError(f"train.preference.kind={self.config.kind!r} needs paired data (rejected responses); "
                              f"data.name={config.data.name!r} gives none here: set data.rejected (ProntoQA)")

    def inputs(self, batch):
        return stacked(batch, self.config.kind, "inputs")

    def loss(self, logits, batch: dict, count, accumulate: int, frozen_logits=None):
        """The pair loss on both halves, + sft_weight x the chosen rows' language-modelling objective (whose
        cross-entropy is logged as `loss`, so an SFT run and its preference run compare)."""
        ref_logits = frozen_logits(self.inputs(batch)) if frozen_logits is not None else None
        pair_loss, pair_metrics = objective(self.config, logits, ref_logits, batch)
        lm_loss, sums = super().loss(logits[:len(batch["inputs"])], batch, count, accumulate)
        sums = {**sums, **{f"preference/{k}": v / accumulate for k, v in pair_metrics.items()}}
        return pair_loss / accumulate + self.config.sft_weight * lm_loss, sums

    def metrics(self, sums: dict, count) -> dict:
        return {**super().metrics(sums, count), **{k: v for k, v in sums.items() if k.startswith("preference/")}}


ROW_KEYS = ("inputs", "targets", "loss_mask")


def mismatched(batch: dict) -> dict:
    """KTO's mismatched pairs: row i's prompt (every position before its first response token) followed by row
    i - 1's chosen response (cyclically), cut at the row's length; {"inputs", "targets", "loss_mask"} [B, L], the
    mask on the borrowed response's tokens."""
    rows = jnp.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)  # the rows' L + 1 tokens
    response = jnp.concatenate([jnp.zeros_like(batch["loss_mask"][:, :1]), batch["loss_mask"]], axis=1) > 0
    start, length = jnp.argmax(response, axis=1), jnp.sum(response, axis=1)
    donor_rows, donor_start, donor_length = (jnp.roll(v, 1, axis=0) for v in (rows, start, length))
    offset = jnp.arange(rows.shape[1])[None, :] - start[:, None]  # position within the borrowed response
    borrowed = (offset >= 0) & (offset < donor_length[:, None])
    taken = jnp.take_along_axis(donor_rows, jnp.clip(donor_start[:, None] + offset, 0, rows.shape[1] - 1), axis=1)
    row = jnp.where(borrowed, taken, rows)
    return {"inputs": row[:, :-1], "targets": row[:, 1:], "loss_mask": borrowed[:, 1:].astype(batch["loss_mask"].dtype)}


def parts(batch: dict, kind: str) -> list[dict]:
    """The row sets the pair loss reads, in order: chosen, rejected, and for KTO its mismatched pairs."""
    chosen, rejected = ({k: batch[prefix + k] for k in ROW_KEYS} for prefix in ("", "rejected_"))
    return [chosen, rejected, mismatched(batch)] if kind == "kto" else [chosen, rejected]


def stacked(batch: dict, kind: str, key: str):
    """`key` of parts(batch, kind) stacked along the batch: [2B or 3B, ...]."""
    return jnp.concatenate([part[key] for part in parts(batch, kind)], axis=0)


def objective(config: PreferenceConfig, logits, ref_logits, batch: dict):
    """(the mean preference loss, metrics) from the policy's (and the reference's, or None) logits [2B or 3B, L, V]
    over stacked(batch, config.kind, "inputs")."""
    targets, mask = stacked(batch, config.kind, "targets"), stacked(batch, config.kind, "loss_mask")
    logps, lengths = losses.sequence_logps(logits, targets, mask)
    b = len(batch["inputs"])
    chosen, rejected = slice(0, b), slice(b, 2 * b)
    ref, kl_pairs = [None, None], {}
    metrics = {"chosen_logps": jnp.mean(logps[chosen]), "rejected_logps": jnp.mean(logps[rejected])}
    if ref_logits is not None:
        ref_logps, _ = losses.sequence_logps(ref_logits, targets, mask)
        ref = [ref_logps[chosen], ref_logps[rejected]]
        metrics["kl_ref"] = jnp.mean(jnp.sum(token_kl(logits[chosen], ref_logits[chosen]) * mask[chosen], axis=-1))
        if config.kind == "kto":
            kl_pairs = dict(kl_logps=logps[2 * b:], ref_kl_logps=ref_logps[2 * b:])
    loss, pair_metrics = losses.preference_loss(
        logps[chosen], logps[rejected], *ref, kind=config.kind, beta=config.beta,
        label_smoothing=config.label_smoothing, gamma=config.gamma, chosen_lengths=jnp.maximum(lengths[chosen], 1.0),
        rejected_lengths=jnp.maximum(lengths[rejected], 1.0), desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight, ipo_per_token=config.ipo_per_token, **kl_pairs)
    return loss, {"loss": loss, **metrics, **pair_metrics}


def token_kl(logits, ref_logits):
    """KL(softmax(logits) || softmax(ref_logits)) per position [B, L]."""
    log_p, log_q = jax.nn.log_softmax(logits, axis=-1), jax.nn.log_softmax(ref_logits, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
