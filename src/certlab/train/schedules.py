"""Schedules of ε, κ and CROWN-IBP's β over training, evaluated at a fractional epoch t = epoch + step/steps.

Ramp position: s = clip((t − start) / ramp, 0, 1) (s = 1 when ramp = 0 and t ≥ start, 0 before start).

- ε "linear": ε(t) = ε_max · s.
- ε "smoothed" (Shi et al. 2021): a slow start followed by a linear ramp. With the mid point m = 1/4 and power p = 4,
  g(s) = a·s^p for s ≤ m and g(s) = a·m^p + a·p·m^(p−1)·(s − m) afterwards, a = 1 / (m^p + p·m^(p−1)·(1 − m)), so
  g is continuous with a continuous derivative and g(1) = 1; ε(t) = ε_max · g(s).
- κ and β go linearly from their start to their end value over the same ramp.
"""

from __future__ import annotations

MID, POWER = 0.25, 4.0


def ramp_position(t: float, start: float, length: float) -> float:
    if t < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (t - start) / length)


def smoothed(s: float, mid: float = MID, power: float = POWER) -> float:
    a = 1.0 / (mid ** power + power * mid ** (power - 1) * (1.0 - mid))
    if s <= mid:
        return a * s ** power
    return a * mid ** power + a * power * mid ** (power - 1) * (s - mid)


def eps_at(cfg, t: float) -> float:
    s = ramp_position(t, cfg.eps_start_epoch, cfg.eps_ramp_epochs)
    g = smoothed(s) if cfg.eps_schedule == "smoothed" else s
    return float(min(cfg.eps, cfg.eps * g))


def linear(start: float, end: float, s: float) -> float:
    return start + (end - start) * s


def kappa_at(cfg, t: float) -> float:
    return linear(cfg.kappa_start, cfg.kappa_end, ramp_position(t, cfg.eps_start_epoch, cfg.eps_ramp_epochs))


def beta_at(cfg, t: float) -> float:
    return linear(cfg.beta_start, cfg.beta_end, ramp_position(t, cfg.eps_start_epoch, cfg.eps_ramp_epochs))


def in_warmup(cfg, t: float) -> bool:
    """True until the ε ramp has reached its end."""
    return ramp_position(t, cfg.eps_start_epoch, cfg.eps_ramp_epochs) < 1.0
