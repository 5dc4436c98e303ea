"""Schedules of ε, κ and CROWN-IBP's β over training, evaluated at a fractional epoch t = epoch + step/steps.

Ramp position: s = clip((t − start) / ramp, 0, 1) (s = 1 when ramp = 0 and t ≥ start, 0 before start).

- ε "linear": ε(t) = ε_max · s.
- ε "smoothed" (Shi et al. 2021): a slow start followed by a linear ramp. With the mid point m = 1/4 and power p = 4,
  g(s) = a·s^p for s ≤ m and g(s) = a·m^p + a·p·m^(p−1)·(s − m) afterwards, a = 1 / (m^p + p·m^(p−1)·(1 − m)), so
  g is continuous with a continuous derivative and g(1) = 1; ε(t) = ε_max · g(s).
- κ and β go linearly from their start to their end value over the same ramp.

Auto values. ``eps_start_epoch``, ``eps_ramp_epochs``, ``eps_schedule``, ``kappa_start`` and ``kappa_end`` may be
None ("auto"); :func:`resolve` (the one place that decides them) fills them in:

- a certified-type objective (:data:`RAMPED`) whose ε ramp is unset (``eps_start_epoch`` and ``eps_ramp_epochs``
  both auto) gets the default recipe: a clean warm-up of ``WARMUP`` · epochs, a ``smoothed`` ε ramp over ``RAMP`` ·
  epochs and κ from 1 to 0 over the ramp (``adaptive``: κ = 0 throughout, ACERT's MNIST setting, whose warm-up
  is clean anyway: at ε_t = 0 every training radius is 0 and its certified loss is the clean loss);
- any other objective, or a run that sets the ramp itself (as the study files do), gets the plain values: no
  warm-up, no ramp (full ε from the first step), ``linear``, κ = 0;
- ``kappa_end`` left auto is 0, except for ``adaptive``, where κ is a constant trade-off weight: ``kappa_start``;
- ``ibp_init`` left auto is True for the state-of-the-art objectives (:data:`IBP_INIT`), False otherwise.

A value that is set is never changed. Training resolves its config once, at the start of a run, and stores the
resolved values (``config.yaml``, checkpoints), so a resumed or extended run keeps its schedule.
"""

from __future__ import annotations

MID, POWER = 0.25, 4.0

AUTO = ("eps_start_epoch", "eps_ramp_epochs", "eps_schedule", "kappa_start", "kappa_end", "ibp_init")
"""Schedule fields whose None means "auto" (decided by :func:`resolve`)."""
RAMPED = ("certified", "adaptive", "sabr", "taps", "staps", "mtl-ibp", "exp-ibp", "cc-ibp")
"""Objectives that get the default recipe (a warm-up, an ε ramp and a κ schedule) when their ramp is unset."""
IBP_INIT = ("sabr", "taps", "staps", "mtl-ibp", "exp-ibp", "cc-ibp")
"""Objectives whose ``ibp_init`` left auto is True (CTBench initialises all of them so; TAPS does not train without
it at the default recipe's short ramps)."""
WARMUP, RAMP = 0.05, 0.5  # fractions of the run's epochs: clean warm-up, then the ε ramp


def auto_values(cfg) -> dict:
    """The values of the auto (None) schedule fields of ``cfg``, by the rules of the module docstring."""
    unset = {name for name in AUTO if getattr(cfg, name) is None}
    if not unset:
        return {}
    recipe = cfg.objective in RAMPED and cfg.eps_start_epoch is None and cfg.eps_ramp_epochs is None
    e = float(cfg.epochs)
    out = {"eps_start_epoch": round(WARMUP * e, 6) if recipe else 0.0,
           "eps_ramp_epochs": round(RAMP * e, 6) if recipe else 0.0,
           "eps_schedule": "smoothed" if recipe else "linear",
           "kappa_start": 1.0 if recipe and cfg.objective != "adaptive" else 0.0}
    kappa_start = out["kappa_start"] if cfg.kappa_start is None else cfg.kappa_start
    out["kappa_end"] = kappa_start if cfg.objective == "adaptive" else 0.0
    out["ibp_init"] = cfg.objective in IBP_INIT
    return {name: out[name] for name in AUTO if name in unset}


def resolve(cfg):
    """``cfg`` with every auto schedule field filled in (a new config; ``cfg`` itself when none is auto)."""
    values = auto_values(cfg)
    return cfg.replace(**values) if values else cfg


def _v(cfg):
    """The schedule fields of ``cfg`` (auto ones resolved), cheaply: an object with the AUTO attributes."""
    values = auto_values(cfg)
    if not values:
        return cfg
    return _Values({**{n: getattr(cfg, n) for n in AUTO}, **values, "eps": cfg.eps, "beta_start": cfg.beta_start,
                    "beta_end": cfg.beta_end})


class _Values:
    def __init__(self, d):
        self.__dict__.update(d)


def describe(cfg) -> str:
    """One line naming the resolved schedule, e.g. "warm-up 0.15 ep, ε ramp 1.5 ep (smoothed), κ 1→0"; auto values
    are marked (auto)."""
    unset = {name for name in AUTO if getattr(cfg, name) is None}
    r = _v(cfg)

    def tag(*names):
        return " (auto)" if any(n in unset for n in names) else ""

    def num(v):
        return f"{v:g}"

    warm = (f"warm-up {num(r.eps_start_epoch)} ep (ε = 0){tag('eps_start_epoch')}" if r.eps_start_epoch > 0
            else f"no warm-up{tag('eps_start_epoch')}")
    if r.eps_ramp_epochs > 0:
        ramp = (f"ε ramp {num(r.eps_ramp_epochs)} ep to {num(cfg.eps)} ({r.eps_schedule})"
                f"{tag('eps_ramp_epochs', 'eps_schedule')}")
    else:
        ramp = f"no ε ramp (ε = {num(cfg.eps)} at once){tag('eps_ramp_epochs')}"
    if cfg.objective not in RAMPED:  # κ weighs the clean loss of the certified-type objectives only
        return f"{warm}, {ramp}"
    kappa = (f"κ {num(r.kappa_start)}" if r.kappa_start == r.kappa_end
             else f"κ {num(r.kappa_start)}→{num(r.kappa_end)} over the ramp")
    init = ", IBP initialisation (auto)" if "ibp_init" in unset and r.ibp_init else ""
    return f"{warm}, {ramp}, {kappa}{tag('kappa_start', 'kappa_end')}{init}"


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
    cfg = _v(cfg)
    s = ramp_position(t, cfg.eps_start_epoch, cfg.eps_ramp_epochs)
    g = smoothed(s) if cfg.eps_schedule == "smoothed" else s
    return float(min(cfg.eps, cfg.eps * g))


def linear(start: float, end: float, s: float) -> float:
    return start + (end - start) * s


def kappa_at(cfg, t: float) -> float:
    cfg = _v(cfg)
    return linear(cfg.kappa_start, cfg.kappa_end, ramp_position(t, cfg.eps_start_epoch, cfg.eps_ramp_epochs))


def beta_at(cfg, t: float) -> float:
    cfg = _v(cfg)
    return linear(cfg.beta_start, cfg.beta_end, ramp_position(t, cfg.eps_start_epoch, cfg.eps_ramp_epochs))


def in_warmup(cfg, t: float) -> bool:
    """True until the ε ramp has reached its end."""
    cfg = _v(cfg)
    return ramp_position(t, cfg.eps_start_epoch, cfg.eps_ramp_epochs) < 1.0
