"""Loose parametrised Box (Jovanović et al. 2022, Table 4): IBP whose every pre-ReLU interval is widened.

Two families, named as relaxations (``resolve_method`` accepts them, so they work in training, evaluation and
``certlab certify``):

- ``box-c:ω`` (continuous): [l, u] ↦ [l − ω, u + ω];
- ``box-dc:ω:F`` (discontinuous): [l, u] ↦ [l − ω(⌈Fl⌉ − Fl), u + ω(Fu − ⌊Fu⌋)]. The widening of each end is ω times
  the distance of F·l (F·u) to the next integer below (above) it, so it lies in [0, ω) — never more than box-c's —
  and it drops from ≈ ω to 0 whenever F·l or F·u crosses an integer: the bounds, and with them the loss, are
  discontinuous functions of the weights, F times per unit of l or u.

ω ≥ 0 and F > 0 are finite numbers. The widening is applied at every ReLU input, after the interval (and, for sets
that are not boxes, the exact first-layer bound) of that node is known, and the pass goes on from the widened
interval, so later layers see it. Both only enlarge IBP's intervals, so both are sound: every point's activations
stay inside them. ``box-c:0`` is IBP. As in the authors' code, ⌈·⌉ and ⌊·⌋ pass no gradient, so in training the
derivative of box-dc's lower end with respect to l is 1 + ωF (and the same for the upper end).
"""

from __future__ import annotations

import math

import torch

from certlab.bounds.ibp import interval_pass
from certlab.errors import InputError

PREFIXES = ("box-c", "box-dc")
SYNTAX = "box-c:OMEGA or box-dc:OMEGA:F (OMEGA >= 0, F > 0)"


def _number(text, what, name, positive=False):
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"relaxation {name!r}: {what} must be a number, got {text!r} ({SYNTAX})") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise InputError(f"relaxation {name!r}: {what} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {text!r} ({SYNTAX})")
    return v


def is_loosebox(name: str) -> bool:
    return isinstance(name, str) and name.lower().split(":")[0] in PREFIXES


def parse(name: str):
    """'box-c:ω' -> ('c', ω, None); 'box-dc:ω:F' -> ('dc', ω, F). Bad parameters raise a one-line InputError."""
    parts = name.lower().split(":")
    kind = parts[0]
    if kind == "box-c":
        if len(parts) != 2:
            raise InputError(f"relaxation {name!r}: box-c takes one parameter, box-c:OMEGA ({SYNTAX})")
        return "c", _number(parts[1], "OMEGA", name), None
    if kind == "box-dc":
        if len(parts) != 3:
            raise InputError(f"relaxation {name!r}: box-dc takes two parameters, box-dc:OMEGA:F ({SYNTAX})")
        return "dc", _number(parts[1], "OMEGA", name), _number(parts[2], "F", name, positive=True)
    raise InputError(f"not a loose-box relaxation: {name!r} ({SYNTAX})")


def canonical(name: str) -> str:
    kind, omega, f = parse(name)
    return f"box-c:{omega:g}" if kind == "c" else f"box-dc:{omega:g}:{f:g}"


def widen(l, u, kind, omega, f=None):
    """The widened interval (see module doc)."""
    if kind == "c":
        return l - omega, u + omega
    fl, fu = f * l, f * u
    return l - omega * (torch.ceil(fl) - fl), u + omega * (fu - torch.floor(fu))


class LooseBox:
    """A relaxation module (``compute``/``intermediate``, like :mod:`certlab.bounds.ibp`) for one name."""

    def __init__(self, name: str):
        self.name = canonical(name)
        self.kind, self.omega, self.f = parse(self.name)

    def _tighten(self, i, l, u, pre, exact):
        return widen(l, u, self.kind, self.omega, self.f)

    def compute(self, g, x, threat, lower_only=False, **_):
        _, (l, u), _ = interval_pass(g, x, threat, keep_pre=True, tighten=self._tighten)
        return l, u

    def intermediate(self, g, x, threat, **_):
        return interval_pass(g, x, threat, tighten=self._tighten)[0]


def module(name: str) -> LooseBox:
    return LooseBox(name)
