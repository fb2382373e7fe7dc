"""KL weighting schedules: the objective is -log p(x|z) + penalty(KL, step)."""

from __future__ import annotations

import torch

from core.config import BetaCapacity, BetaConfig, BetaCyclical, BetaLinear


class BetaSchedule:
    """Turns the KL term into the loss penalty at each optimizer step; its state is the step."""

    def __init__(self, cfg: BetaConfig):
        self.cfg = cfg
        self.step = 0

    def beta(self, step: int | None = None) -> float:
        """The weight on KL at `step` (for capacity: gamma)."""
        c, t = self.cfg, self.step if step is None else step
        if isinstance(c, BetaLinear):
            return c.value * min(1.0, t / c.warmup_steps)
        if isinstance(c, BetaCyclical):
            phase = (t % c.cycle_steps) / c.cycle_steps
            return c.value * min(1.0, phase / c.ratio)
        if isinstance(c, BetaCapacity):
            return c.gamma
        return c.value

    def capacity(self, step: int | None = None) -> float | None:
        """C(t) for the capacity schedule (Burgess et al. 2018), else None."""
        c, t = self.cfg, self.step if step is None else step
        if isinstance(c, BetaCapacity):
            return c.max_capacity * min(1.0, t / c.capacity_steps)
        return None

    def penalty(self, kl: torch.Tensor) -> torch.Tensor:
        """beta * KL, or gamma * |KL - C| for capacity; kl (B,) -> (B,)."""
        cap = self.capacity()
        if cap is not None:
            return self.beta() * (kl - cap).abs()
        return self.beta() * kl

    def state_dict(self) -> dict:
        """Checkpointable state."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore from state_dict()."""
        self.step = int(state["step"])
