"""Relaxation diagnostics: how tight, how unstable, how continuous and how sensitive each relaxation is on a model.

Per relaxation, on the first ``n`` samples of a dataset:

- ``width``: mean width u − l of the output (logit) bounds;
- ``lp_gap``: mean over ``lp_samples`` samples and the margins f_y − f_j of (LP optimum − relaxation bound), the LP
  being the triangle relaxation with CROWN intermediate bounds (≥ 0 up to solver precision for relaxations that are
  no tighter than it; negative only if a relaxation beats the LP, e.g. by tighter intermediate bounds);
- ``certified``: fraction of samples certified;
- ``unstable``: mean number of crossing ReLUs (l < 0 < u) per sample under the relaxation's own pre-activation bounds;
- ``continuity`` (Jovanović et al. 2022): the certified loss L(θ + t·d) = CE(−margins) on a fine grid of t ∈ [−1, 1]
  along a random direction d (‖d‖ = ``radius``·‖θ‖); reported as the largest |ΔL|/Δt between neighbours
  (``max_slope``) and as that jump over the median one (``jump_ratio``: ≫ 1 means a discontinuity);
- ``sensitivity``: ‖∇_θ L‖₂ relative to IBP's on the same batch.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from certlab.attacks.base import eval_mode
from certlab.bounds.api import bounds, margins, resolve_method
from certlab.bounds.engine import relu_bounds
from certlab.bounds.rounding import settle
from certlab.errors import InputError
from certlab.threat import ThreatSet


def certified_loss(model, x, y, threat, method):
    """CE(−m, y) with m the lower margin bounds (column y = 0): the certified training loss."""
    m = margins(model, x, y, threat, method)
    return F.cross_entropy(-m, y)


def _threat(threat, x):
    if isinstance(threat, ThreatSet):
        return threat
    if callable(threat):
        return threat(x)
    raise InputError(f"threat must be a certlab threat set or a callable x -> set, got {type(threat).__name__}")


def continuity(model, x, y, threat, method, grid=41, radius=0.05, seed=0):
    """(max_slope, jump_ratio) of the certified loss along a random weight direction (see module doc)."""
    if grid < 3:
        raise InputError(f"grid must be >= 3 points, got {grid}")
    net = copy.deepcopy(model).eval()
    params = [p for p in net.parameters()]
    g = torch.Generator().manual_seed(seed)
    d = [torch.randn(p.shape, generator=g).to(p) for p in params]
    norm_p = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in params))
    norm_d = math.sqrt(sum(float((v ** 2).sum()) for v in d))
    scale = radius * norm_p / max(norm_d, 1e-12)
    base = [p.detach().clone() for p in params]
    ts = torch.linspace(-1.0, 1.0, grid)
    vals = []
    with torch.no_grad():
        for t in ts.tolist():
            for p, b0, v in zip(params, base, d):
                p.copy_(b0 + t * scale * v)
            vals.append(float(certified_loss(net, x, y, threat, method)))
    diffs = torch.tensor(vals).diff().abs()
    step = float(ts[1] - ts[0])
    med = float(diffs.median())
    return float(diffs.max()) / step, float(diffs.max()) / max(med, 1e-12)


def grad_norm(model, x, y, threat, method) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = certified_loss(model, x, y, threat, method)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return math.sqrt(sum(float((gr ** 2).sum()) for gr in grads if gr is not None))


def diagnose(model, dataset, threat, relaxations=("ibp", "hbox", "crown", "deepz", "crown-ibp"), n: int = 64,
             lp_samples: int = 4, grid: int = 41, radius: float = 0.05, seed: int = 0) -> list:
    """One dict per relaxation with keys relaxation, width, lp_gap, certified, unstable, max_slope, jump_ratio,
    sensitivity (see module doc). ``dataset``: an object with ``.x``/``.y`` tensors or an (x, y) pair; ``threat``:
    a threat set or a callable x -> set."""
    x, y = (dataset.x, dataset.y) if hasattr(dataset, "x") else dataset
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    x, y = x[:n], y[:n].long()
    names = [resolve_method(r) for r in relaxations]
    if not names:
        raise InputError("give at least one relaxation")
    th = _threat(threat, x)
    with eval_mode(model):
        lp_m = None
        if lp_samples > 0:
            from certlab.verify.lp import lp_margins

            k = min(lp_samples, x.shape[0])
            from certlab.train.threats import batch_threat

            lp_m = lp_margins(model, x[:k], y[:k], batch_threat(th, x[:k], torch.arange(k)))
        ibp_grad = grad_norm(model, x, y, th, "ibp")
        rows = []
        for m in names:
            with torch.no_grad():
                b = bounds(model, x, th, m)
                mg = margins(model, x, y, th, m)
            K = mg.shape[1]
            off = ~F.one_hot(y, K).bool()
            settled = settle(model, x, y, th, m, mg)  # certificates within rounding of zero: decided in float64
            cert = (settled.masked_fill(~off, float("inf")) > 0).all(1)
            unstable = sum(((l < 0) & (u > 0)).flatten(1).sum(1).float() for l, u in relu_bounds(model, x, th, m))
            row = {"relaxation": m, "width": float((b.upper - b.lower).mean()),
                   "lp_gap": None, "certified": float(cert.float().mean()),
                   "unstable": float(unstable.mean()) if torch.is_tensor(unstable) else 0.0}
            if lp_m is not None:
                k = lp_m.shape[0]
                solved = off[:k] & torch.isfinite(lp_m)  # an LP that hit its time limit gives −inf: left out
                row["lp_gap"] = float((lp_m - mg[:k])[solved].mean()) if solved.any() else None
            row["max_slope"], row["jump_ratio"] = continuity(model, x, y, th, m, grid, radius, seed)
            row["sensitivity"] = grad_norm(model, x, y, th, m) / max(ibp_grad, 1e-12)
            rows.append(row)
    return rows


def format_rows(rows: list, title: str | None = None) -> str:
    head = ["relaxation", "width", "LP gap", "certified", "unstable", "max slope", "jump ratio", "sensitivity"]
    keys = ["relaxation", "width", "lp_gap", "certified", "unstable", "max_slope", "jump_ratio", "sensitivity"]

    def cell(k, v):
        if v is None:
            return "-"
        if k == "relaxation":
            return str(v)
        if k == "certified":
            return f"{100 * v:.1f}%"
        return f"{v:.4g}"

    lines = [[cell(k, r.get(k)) for k in keys] for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cs: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))  # noqa: E731
    out = [title] if title else []
    out += [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(l) for l in lines]
    return "\n".join(out)
