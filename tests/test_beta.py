"""The built-in schedules (plugins/schedules.py) through core/beta.py: KL weights at hand-computed steps, capacity
penalty, state round trip, config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from vaeflow.core.beta import BetaSchedule, schedule_class
from vaeflow.core.config import config_model
from vaeflow.core.registry import get_registry


def train(beta: dict | None = None):
    """The typed train section (schedules from the registry) with this beta mapping, validated as a config would be."""
    section = config_model().model_fields["train"].annotation
    return section.model_validate({} if beta is None else {"beta": beta})


def schedule(**beta) -> BetaSchedule:
    return BetaSchedule(train(beta).beta)


def test_constant():
    s = schedule(value=4.0)
    for t in (0, 1, 999, 10**7):
        assert s.beta(t) == 4.0
    assert s.capacity() is None and s.capacity(50) is None
    assert schedule().beta(0) == 1.0  # default value 1: the plain ELBO
    kl = torch.tensor([0.0, 2.5, 10.0])
    torch.testing.assert_close(s.penalty(kl), torch.tensor([0.0, 10.0, 40.0]))


def test_linear_warmup():
    s = schedule(schedule="linear", value=2.0, warmup_steps=100)
    hand = {0: 0.0, 1: 0.02, 25: 0.5, 50: 1.0, 99: 1.98, 100: 2.0, 101: 2.0, 5000: 2.0}
    for t, want in hand.items():
        assert s.beta(t) == pytest.approx(want, rel=1e-12, abs=0), t
    # the default argument is the schedule's own step
    s.step = 50
    assert s.beta() == pytest.approx(1.0)
    torch.testing.assert_close(s.penalty(torch.tensor([3.0, 0.5])), torch.tensor([3.0, 0.5]))
    s.step = 0
    assert torch.equal(s.penalty(torch.tensor([3.0, 0.5])), torch.zeros(2))
    # monotone non-decreasing over the whole warm-up
    vals = [s.beta(t) for t in range(0, 130)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_cyclical():
    s = schedule(schedule="cyclical", value=1.0, cycle_steps=100, ratio=0.5)
    # rises over the first 50 steps of each 100-step cycle, holds at 1, restarts at 0 every 100 steps
    hand = {0: 0.0, 10: 0.2, 25: 0.5, 49: 0.98, 50: 1.0, 75: 1.0, 99: 1.0,
            100: 0.0, 110: 0.2, 150: 1.0, 199: 1.0, 200: 0.0, 325: 0.5}
    for t, want in hand.items():
        assert s.beta(t) == pytest.approx(want, rel=1e-12, abs=1e-15), t
    s3 = schedule(schedule="cyclical", value=3.0, cycle_steps=40, ratio=0.25)
    hand = {0: 0.0, 5: 1.5, 10: 3.0, 39: 3.0, 40: 0.0, 45: 1.5, 50: 3.0}
    for t, want in hand.items():
        assert s3.beta(t) == pytest.approx(want, rel=1e-12, abs=1e-15), t
    # ratio 1: a sawtooth that never holds
    s1 = schedule(schedule="cyclical", value=1.0, cycle_steps=10, ratio=1.0)
    assert [s1.beta(t) for t in range(12)] == pytest.approx([0, .1, .2, .3, .4, .5, .6, .7, .8, .9, 0, .1])
    assert s.capacity(10) is None
    # the default ratio is 0.5
    assert train({"schedule": "cyclical", "cycle_steps": 10}).beta.ratio == 0.5


def test_capacity():
    s = schedule(schedule="capacity", gamma=100.0, max_capacity=20.0, capacity_steps=1000)
    hand = {0: 0.0, 100: 2.0, 500: 10.0, 999: 19.98, 1000: 20.0, 5000: 20.0}
    for t, want in hand.items():
        assert s.capacity(t) == pytest.approx(want, rel=1e-12, abs=0), t
        assert s.beta(t) == 100.0  # gamma, constant
    kl = torch.tensor([0.0, 5.0, 10.0, 25.0])
    s.step = 500  # C = 10
    torch.testing.assert_close(s.penalty(kl), torch.tensor([1000.0, 500.0, 0.0, 1500.0]))  # gamma |kl - C|
    s.step = 0  # C = 0: penalty = gamma * kl
    torch.testing.assert_close(s.penalty(kl), 100.0 * kl)
    s.step = 10**6  # C saturates at 20
    torch.testing.assert_close(s.penalty(kl), torch.tensor([2000.0, 1500.0, 1000.0, 500.0]))
    # the penalty pushes KL towards C from both sides: its gradient is gamma * sign(kl - C)
    s.step = 500
    k = torch.tensor([4.0, 16.0], requires_grad=True)
    s.penalty(k).sum().backward()
    torch.testing.assert_close(k.grad, torch.tensor([-100.0, 100.0]))


def test_state_dict_round_trip():
    cfg = train({"schedule": "linear", "value": 1.0, "warmup_steps": 200}).beta
    s = BetaSchedule(cfg)
    assert s.step == 0 and s.state_dict() == {"step": 0}
    s.step = 137
    state = s.state_dict()
    assert state == {"step": 137}
    fresh = BetaSchedule(cfg)
    assert fresh.beta() == 0.0
    fresh.load_state_dict(state)
    assert fresh.step == 137 and fresh.beta() == s.beta() == pytest.approx(137 / 200)
    s.step = 150  # the saved state is a snapshot, not a live view
    assert state == {"step": 137}
    # a state that went through JSON/torch.save may hold a tensor or float: it is coerced to int
    fresh.load_state_dict({"step": torch.tensor(42)})
    assert fresh.step == 42 and isinstance(fresh.step, int)
    cap = schedule(schedule="capacity", max_capacity=10.0, capacity_steps=100)
    cap.load_state_dict({"step": 30})
    assert cap.capacity() == pytest.approx(3.0)


@pytest.mark.parametrize(
    "beta",
    [
        dict(value=-0.1),
        dict(schedule="linear", value=-1.0, warmup_steps=10),
        dict(schedule="linear", value=1.0, warmup_steps=0),
        dict(schedule="linear", value=1.0, warmup_steps=-5),
        dict(schedule="linear", value=1.0),  # warmup_steps is required
        dict(schedule="cyclical", value=-2.0, cycle_steps=10),
        dict(schedule="cyclical", cycle_steps=0),
        dict(schedule="cyclical", cycle_steps=10, ratio=0.0),
        dict(schedule="cyclical", cycle_steps=10, ratio=1.5),
        dict(schedule="capacity", gamma=0.0, capacity_steps=10),
        dict(schedule="capacity", max_capacity=-1.0, capacity_steps=10),
        dict(schedule="capacity", capacity_steps=0),
        dict(value=1.0, warmup_steps=10),  # unknown keys are errors (constant has no warmup_steps)
        dict(schedule="exponential"),  # not a registered schedule
    ],
)
def test_invalid_configs_rejected(beta):
    with pytest.raises(ValidationError):
        train(beta)


def test_schedules_are_plugins_selected_by_their_tag():
    names = {"constant": "Constant", "linear": "Linear", "cyclical": "Cyclical", "capacity": "Capacity"}
    assert set(names) <= set(get_registry().names("schedule"))
    for tag, cls_name in names.items():
        spec = train({"schedule": tag, "warmup_steps": 5} if tag == "linear" else {"schedule": tag, "cycle_steps": 5}
                     if tag == "cyclical" else {"schedule": tag, "capacity_steps": 5} if tag == "capacity"
                     else {"schedule": tag, "value": 2})
        assert spec.beta.schedule == tag and schedule_class(spec.beta).__name__ == cls_name
    assert [schedule_class(train({"schedule": t, **o}).beta).constant for t, o in
            (("constant", {}), ("linear", {"warmup_steps": 5}))] == [True, False]
    # through the train section, as a config file would give it
    assert BetaSchedule(train({"schedule": "linear", "value": 0.5, "warmup_steps": 4}).beta).beta(2) == pytest.approx(0.25)
    default = train().beta  # left out: constant, value 1 (the plain ELBO)
    assert default.schedule == "constant" and default.value == 1.0
    assert train({"value": 3}).beta.schedule == "constant"  # `schedule` may be left out for the constant default



@pytest.mark.parametrize("beta, field", [("{value: 4.0}", "train.beta.value"),
                                         ("{schedule: linear, value: 1.0, warmup_steps: 10}", "train.beta")])
def test_a_kind_without_a_weighted_term_refuses_a_beta_it_would_ignore(beta, field):
    from vaeflow.core.config import apply_sets, load_config
    from vaeflow.core.errors import ConfigError
    from vaeflow.core.model import build_model

    tiny = load_config(Path(__file__).resolve().parents[1] / "configs" / "vae-shapes-tiny.yaml")
    for kind in ("ae", "iwae"):  # neither has a KL term for beta to weight
        with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ":"):
            build_model(apply_sets(tiny, [f"model.kind={kind}", f"train.beta={beta}"]))
    assert build_model(apply_sets(tiny, ["model.kind=iwae", "train.beta={value: 1.0}"]))  # 1, the default, is fine
