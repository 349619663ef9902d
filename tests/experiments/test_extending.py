"""The worked example of docs/guides/extending.md, "an objective": focal loss added as one class and one entry
of the objectives table (the guide shows the code between the snippet markers below). Its step descends the
focal loss written out by hand, and the trainer runs it by `train.objective` with its own key section."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.config_fields import field
from experiments import losses, objectives
from experiments.optim import optimizers
from experiments.training import metrics_writer, train_state, trainer
from experiments.configs import base
from experiments.objectives import language_modelling
from tests.conftest import make_tiny_config
from tests.experiments.test_optimizers import _tiny_lm_and_batch


# --8<-- [start:focal]
@dataclasses.dataclass(frozen=True)
class FocalConfig:
    """`config.train.focal`."""

    gamma: float = field(2.0, min=0)  # the focusing exponent; 0 is cross-entropy


@dataclasses.dataclass(frozen=True)
class FocalLoss(language_modelling.LanguageModelling):
    """Focal loss (Lin et al. 2017): each scored token's cross-entropy scaled by (1 - p_t)^gamma,

        objective = sum over masked tokens of -(1 - p_t)^gamma log p_t / tokens
    """

    gamma: float = 2.0
    section, keys = "focal", FocalConfig()  # its keys: config.train.focal.gamma

    @classmethod
    def from_config(cls, config) -> "FocalLoss":
        return cls(gamma=config.train.focal.gamma)

    def loss(self, logits, batch, count, accumulate, frozen_logits=None):
        sums = losses.masked_sums(logits, batch["targets"], batch["loss_mask"])  # `loss` and `accuracy` as usual
        log_p = losses.token_logps(logits, batch["targets"])
        focal = -((1 - jnp.exp(log_p)) ** self.gamma) * log_p
        sums = {**sums, "focal": jnp.sum(focal * batch["loss_mask"])}
        return sums["focal"] / count, sums

    def metrics(self, sums, count) -> dict:
        return {"focal": sums["focal"] / count}
# --8<-- [end:focal]


@pytest.fixture
def with_focal(monkeypatch):
    """The table entry, `objectives.OBJECTIVES["focal"] = FocalLoss`, for this test only."""
    monkeypatch.setitem(objectives.OBJECTIVES, "focal", FocalLoss)


def test_the_step_descends_the_focal_loss_written_by_hand():
    """SGD at lr 1: the update is minus the gradient of the focal loss written out again."""
    model, batch = _tiny_lm_and_batch(np.random.default_rng(3))
    opt = base.get_config().optimizer
    opt.update(name="sgd", lr=1.0, warmup_steps=0)
    opt.sgd.update(momentum=0.0)
    tx = optimizers.build(opt, 3)
    state = jax.jit(lambda r: nn.meta.unbox(train_state.init_state(model, tx, batch["inputs"], r)))(jax.random.PRNGKey(0))
    new_state, metrics = jax.jit(lambda s, b: trainer.train_step(
        s, b, schedule=optimizers.learning_rate_schedule(opt, 3), objective=FocalLoss(gamma=1.5)))(state, batch)

    def by_hand(params):
        p = jax.nn.softmax(model.apply({"params": params}, batch["inputs"]))
        p_t = jnp.take_along_axis(p, batch["targets"][..., None], -1)[..., 0]
        return jnp.mean(-((1 - p_t) ** 1.5) * jnp.log(p_t))

    expected = jax.tree.map(lambda p, g: p - g, state.params, jax.jit(jax.grad(by_hand))(state.params))
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["focal"], jax.jit(by_hand)(state.params), rtol=1e-5)
    np.testing.assert_allclose(metrics["objective"], metrics["focal"], rtol=1e-6)


def test_the_trainer_runs_it_by_name_with_its_own_keys(with_focal, tmp_path):
    config = make_tiny_config(steps=2)
    with config.unlocked():  # a config file written after the entry was added would have train.focal already
        config.train.objective = "focal"
        config.train.focal = dataclasses.asdict(FocalConfig(gamma=0.5))
    trainer.train_and_evaluate(config, str(tmp_path), verbose=False)
    events = metrics_writer.read(str(tmp_path), "train")
    assert [e["step"] for e in events] == [1, 2] and all(np.isfinite(e["focal"]) for e in events)
    assert all(e["focal"] < e["loss"] for e in events)  # (1 - p_t)^gamma < 1 shrinks every token's term
