"""Built-in weight schedules for the loss term a model schedules (the KL of a VAE), selected by train.beta.schedule.

Higgins et al. 2017 (beta-VAE: a constant beta), Bowman et al. 2016 (linear KL annealing), Fu et al. 2019
(cyclical annealing), Burgess et al. 2018 (controlled capacity: gamma * |KL - C(t)|).
"""

from __future__ import annotations

import torch
from pydantic import Field

from vaeflow.core.bounds import MAX_STEPS
from vaeflow.core.hookspecs import hookimpl
from vaeflow.core.interfaces import Options, Schedule


class Constant(Schedule):
    """loss = -log p(x|z) + beta * KL, beta fixed."""

    name = "constant"
    constant = True

    class Options(Options):
        value: float = Field(1.0, ge=0, description="beta; 1 gives the ELBO, >1 a beta-VAE")

    def beta(self, step: int) -> float:
        """beta at every step."""
        return self.options.value


class Linear(Schedule):
    """KL annealing: beta rises linearly from 0 to `value` over `warmup_steps` (Bowman et al. 2016)."""

    name = "linear"

    class Options(Options):
        value: float = Field(1.0, ge=0, description="beta after warm-up")
        warmup_steps: int = Field(gt=0, le=MAX_STEPS, description="optimizer steps to reach `value`")

    def beta(self, step: int) -> float:
        """value * min(1, step / warmup_steps)."""
        return self.options.value * min(1.0, step / self.options.warmup_steps)


class Cyclical(Schedule):
    """Cyclical annealing (Fu et al. 2019): each cycle rises linearly for `ratio` of it, then holds."""

    name = "cyclical"

    class Options(Options):
        value: float = Field(1.0, ge=0, description="beta at the top of each cycle")
        cycle_steps: int = Field(gt=0, le=MAX_STEPS, description="optimizer steps per cycle")
        ratio: float = Field(0.5, gt=0, le=1, description="fraction of a cycle spent rising")

    def beta(self, step: int) -> float:
        """value * min(1, phase / ratio), phase = (step mod cycle_steps) / cycle_steps."""
        o = self.options
        return o.value * min(1.0, (step % o.cycle_steps) / o.cycle_steps / o.ratio)


class Capacity(Schedule):
    """Controlled capacity (Burgess et al. 2018): loss = -log p(x|z) + gamma * |KL - C(t)|."""

    name = "capacity"

    class Options(Options):
        gamma: float = Field(1000.0, gt=0, description="weight of the capacity penalty")
        max_capacity: float = Field(25.0, ge=0, description="C at the end of the ramp, nats per image")
        capacity_steps: int = Field(gt=0, le=MAX_STEPS, description="optimizer steps over which C rises from 0")

    def beta(self, step: int) -> float:
        """gamma, constant."""
        return self.options.gamma

    def capacity(self, step: int) -> float:
        """C(t) = max_capacity * min(1, step / capacity_steps)."""
        return self.options.max_capacity * min(1.0, step / self.options.capacity_steps)

    def penalty(self, term: torch.Tensor, step: int) -> torch.Tensor:
        """gamma * |KL - C(t)|."""
        return self.beta(step) * (term - self.capacity(step)).abs()

    def logged(self, step: int) -> dict[str, float]:
        """beta (gamma) and C(t)."""
        return {"beta": self.beta(step), "capacity": self.capacity(step)}


@hookimpl
def register_schedules(register):
    """Register the built-in schedules."""
    for cls in (Constant, Linear, Cyclical, Capacity):
        register(cls)
