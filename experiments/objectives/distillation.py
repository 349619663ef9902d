"""Knowledge distillation (`train.objective = "distill"`, or `train.distill.teacher` set; Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network") from a finished run, the teacher (experiments/objectives/frozen.py):

    objective = (1 - a) CE(student, targets) + a T^2 KL(softmax(teacher / T) || softmax(student / T))

(a = `train.distill.weight`, T = `train.distill.temperature`; the T^2 keeps the soft term's gradients on the
scale of the hard one's; label smoothing and the z-loss apply to the CE term as in language modelling.) Logged:
`distill_kl`, the KL's mean over scored tokens.
"""

import dataclasses

from data.config_fields import field
from experiments.objectives import language_modelling


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """`config.train.distill`: the teacher is a finished run folder, restored once."""

    teacher: str = ""  # the teacher's workdir
    weight: float = field(0.5, min=0, max=1)  # a: objective = (1 - a) CE + a T^2 KL(teacher || student)
    temperature: float = field(2.0, above=0)  # T


class Distillation(language_modelling.LanguageModelling):
    selecting_key = "train.distill.teacher"
    section, keys = "distill", DistillConfig()

    @staticmethod
    def problems(config) -> list[str]:
        if not config.train.distill.teacher:
            return ["train.objective='distill' needs train.distill.teacher, the workdir of a finished run"]
        return []

    @classmethod
    def from_config(cls, config) -> "Distillation":
        d = config.train.distill
        return cls(terms=language_modelling.terms(config.train, distill_weight=d.weight, temperature=d.temperature),
                   frozen_folder=d.teacher, frozen_key="train.distill.teacher")
