"""Training objectives: what a train step minimises, one file each behind the `train.objective` table.

    lm          language modelling: masked cross-entropy, with label smoothing and the z-loss  (language_modelling.py)
    distill     distillation from a teacher run                                                (distillation.py)
    preference  DPO, IPO, KTO, SimPO, ORPO on chosen / rejected pairs, against a reference     (preference.py)
    grpo        GRPO on rollouts of the policy, scored by a program                            (grpo.py)

An entry is a subclass of `language_modelling.LanguageModelling` that owns its config keys (a section of
`config.train`) and their rules, its frozen model (a teacher or a reference: frozen.py restores and shards it), its
batch preparation (preference pairs, rollouts), its loss and its logged metrics. Losses the model sows (MoE
balance, MTP depths, early exits, an SAE's) are added by collection whatever the objective (sown.py). The train
step and the loop call the hooks and nothing else: adding an objective is one file and one entry here.

`train.objective = ""` (the default) picks the entry whose keys are set (`train.distill.teacher`,
`train.preference.kind`, `train.grpo.group_size`), language modelling when none is.
"""

from experiments.objectives import distillation, grpo, language_modelling, preference

OBJECTIVES = {
    "lm": language_modelling.LanguageModelling,
    "distill": distillation.Distillation,
    "preference": preference.Preference,
    "grpo": grpo.GRPO,
}


def name(train) -> str:
    """The objective `config.train` asks for: `train.objective`, else the one whose keys are set, else "lm"."""
    if train.get("objective"):
        return train.objective
    return next((n for n, entry in OBJECTIVES.items() if entry.selected_by(train)), "lm")


def problems(config) -> list[str]:
    """One line per problem: another objective's keys set beside the chosen one's, then the chosen one's rules."""
    chosen = name(config.train)
    others = [n for n, entry in OBJECTIVES.items() if n != chosen and entry.selected_by(config.train)]
    if others:
        keys = ", ".join(OBJECTIVES[n].selecting_key for n in others)
        return [f"train.objective={chosen!r}, but {keys} selects {others} too: one objective trains at a time"]
    return OBJECTIVES[chosen].problems(config)


def build(config) -> language_modelling.LanguageModelling:
    """The chosen objective with its keys from `config` (validated)."""
    return OBJECTIVES[name(config.train)].from_config(config)
