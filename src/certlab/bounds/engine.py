"""The dispatch to one relaxation module each: ``bounds``, ``margins``, ``relu_bounds`` (no rounding recheck; the
public ``certify`` in :mod:`certlab.bounds.api` adds it)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from certlab.bounds import alpha_crown, core, crown, crown_ibp, deepz, fastlin, hbox, ibp, loosebox, spec
from certlab.bounds.ops import LinearOp, SpecLinearOp
from certlab.bounds.spec import Spec
from certlab.errors import InputError

RELAXATIONS = {
    "ibp": ibp,
    "hbox": hbox,
    "deepz": deepz,
    "fastlin": fastlin,
    "crown": crown,
    "crown-ibp": crown_ibp,
    "alpha-crown": alpha_crown,
}
METHODS = tuple(RELAXATIONS)
PARAMETRISED = ("box-c:OMEGA", "box-dc:OMEGA:F")  # loose Box (bounds/loosebox.py): any OMEGA >= 0, F > 0
ALIASES = {"box": "ibp", "interval": "ibp", "deeppoly": "crown", "coap": "fastlin", "fast-lin": "fastlin",
           "crownibp": "crown-ibp", "alpha": "alpha-crown", "alphacrown": "alpha-crown", "zonotope": "deepz"}


class Bounds(NamedTuple):
    lower: torch.Tensor
    upper: torch.Tensor | None


def resolve_method(method: str) -> str:
    """The canonical name of a relaxation: one of :data:`METHODS` (or an alias), or a parametrised loose Box
    ``box-c:ω`` / ``box-dc:ω:F`` (written with its numbers in ``%g`` form)."""
    if not isinstance(method, str):
        raise InputError(f"method must be a string, one of {', '.join(METHODS + PARAMETRISED)}")
    m = method.lower().strip()
    if loosebox.is_loosebox(m):
        return loosebox.canonical(m)
    m = ALIASES.get(m, m)
    if m not in RELAXATIONS:
        raise InputError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS + PARAMETRISED)}")
    return m


def module(method: str):
    """The relaxation module (``compute``, ``intermediate``) of a canonical name."""
    mod = RELAXATIONS.get(method)
    return mod if mod is not None else loosebox.module(method)


def fold_spec(g: core.Graph, C) -> core.Graph:
    """A copy of g whose output is C·f: C ([B, S, K], or a :class:`~certlab.bounds.spec.Spec`) is folded into the
    last Linear layer when there is one, else appended as a layer of its own."""
    C = C if isinstance(C, Spec) else spec.from_dense(C)
    S = C.index.shape[1]
    nodes = list(g.nodes)
    last = nodes[-1]
    if last.kind == "affine" and isinstance(last.op, LinearOp):
        nodes[-1] = core.Node("affine", last.inputs, SpecLinearOp(C, last.op.W, last.op.b), last.name, (S,))
    else:
        nodes.append(core.Node("affine", (len(nodes) - 1,), SpecLinearOp(C), "<spec>", (S,)))
    return core.Graph(nodes)


def _prepare(model, x, threat, method):
    method = resolve_method(method)
    core.validate(model, x, threat)
    g = core.build_graph(model, x)
    return method, g


@core.float32_exact
def compute(model, x, threat, method="crown", C=None, lower_only=False, **opts) -> Bounds:
    method, g = _prepare(model, x, threat, method)
    K = core.output_dim(g)
    C = core.check_spec(C, x.shape[0], K, x)
    if C is not None:
        g = fold_spec(g, C)
    low, up = module(method).compute(g, x, threat, lower_only=lower_only, **opts)
    if not core.all_finite(low) or (up is not None and not core.all_finite(up)):
        raise InputError("bounds are not finite (overflow in the model's weights or inputs)")
    return Bounds(low, up)


@core.float32_exact
def intermediate_bounds(g, x, threat, method="crown", **opts):
    """{relu node index: (lower, upper)} pre-activation bounds by the given method."""
    return module(resolve_method(method)).intermediate(g, x, threat, **opts)


def bounds(model, x, threat, method="crown", C=None, **opts) -> Bounds:
    """Sound lower/upper bounds of model(x') (or of C·model(x')) over every x' in ``threat`` around x.

    Without C: lower/upper have the shape of model(x), [B, K]. With C of shape [B, S, K] or [S, K]: bounds of
    C·logits, shape [B, S]. ``method`` is one of :data:`METHODS` or a loose Box (:data:`PARAMETRISED`); extra
    options: ``beta`` (crown-ibp), ``iters``/``lr`` (alpha-crown).
    """
    return compute(model, x, threat, method, C, lower_only=False, **opts)


@core.float32_exact
def margins(model, x, y, threat, method="crown", **opts) -> torch.Tensor:
    """[B, K] lower bounds on f_y(x') − f_j(x') over the set; column y is 0."""
    method, g = _prepare(model, x, threat, method)
    K = core.output_dim(g)
    y = core.check_labels(y, x.shape[0], K, x.device)
    low, _ = module(method).compute(fold_spec(g, spec.margin_table(y, K, x.dtype)), x, threat, lower_only=True,
                                         **opts)
    if not core.all_finite(low):
        raise InputError("margin bounds are not finite (overflow in the model's weights or inputs)")
    return low.masked_fill(torch.nn.functional.one_hot(y, K).bool(), 0.0)


@core.float32_exact
def relu_bounds(model, x, threat, method: str = "crown", **opts):
    """Pre-activation bounds (lower, upper) of every ReLU of ``model`` in order, each [B, *shape]."""
    core.validate(model, x, threat)
    g = core.build_graph(model, x)
    lb = intermediate_bounds(g, x, threat, method, **opts)
    return [lb[i] for i in g.relus]
