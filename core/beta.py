"""The schedule of a model's scheduled loss term (a VAE's KL): train.beta selects a schedule plugin by `schedule`;
this wrapper holds the optimizer step, which is its checkpointed state."""

from __future__ import annotations

import torch

from vaeflow.core.interfaces import Schedule
from vaeflow.core.registry import Registry, get_registry


def schedule_class(spec, registry: Registry | None = None) -> type[Schedule]:
    """The registered schedule class train.beta selects."""
    return (registry or get_registry()).get("schedule", spec.schedule).cls


class BetaSchedule:
    """Turns the scheduled term into its loss penalty at each optimizer step; its state is the step."""

    def __init__(self, spec, registry: Registry | None = None):
        cls = schedule_class(spec, registry)
        self.schedule = cls(cls.Options.model_validate(spec.model_dump(exclude={"schedule"})))
        self.step = 0

    def beta(self, step: int | None = None) -> float:
        """The weight at `step` (default: the current step); for capacity, gamma."""
        return self.schedule.beta(self.step if step is None else step)

    def capacity(self, step: int | None = None) -> float | None:
        """C(t) of a capacity schedule (Burgess et al. 2018), else None."""
        return self.logged(step).get("capacity")

    def logged(self, step: int | None = None) -> dict[str, float]:
        """What the engine records: beta, and e.g. the capacity."""
        return self.schedule.logged(self.step if step is None else step)

    def penalty(self, term: torch.Tensor) -> torch.Tensor:
        """The term's contribution to the loss at the current step: beta * term, or gamma * |term - C|."""
        return self.schedule.penalty(term, self.step)

    def state_dict(self) -> dict:
        """Checkpointable state."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore from state_dict()."""
        self.step = int(state["step"])
