"""Relaxation diagnostics: tightness, continuity and sensitivity of each relaxation (Jovanović et al. 2022), plus
the gap to the triangle LP, the certified share and the unstable ReLUs, on a model.

The paper's properties, and how certlab measures them:

- **Continuity** (paper §4.2): a relaxation is continuous when its ReLU transformer — the lines or box it puts
  around ReLU(z) for pre-activation bounds z ∈ [l, u] — is a continuous function of (l, u); the certified loss is
  then continuous in the weights. CROWN's adaptive lower slope switches 0 ↔ 1 at |l| = |u| and hBox replaces a
  crossing neuron by the box [0, u] but keeps it exact once l ≥ 0: both jump. IBP and DeepZ do not. The paper
  proves these classes; certlab *measures* them on the engine's own code with a probe network (:func:`relu_probe`):
  two inputs x1, x2 in a box chosen so that z = x1 + x2 ranges over exactly [l, u] (x1 ∈ (l + u)/4 ± ρ with ρ fixed,
  x2 ∈ (l + u)/4 ± ((u − l)/2 − ρ): the box is an affine function of (l, u)), the neuron ReLU(z), and the
  outputs ReLU(z) and ReLU(z) − x1 (the second through a second, always-active neuron, so the correlation of the
  ReLU's output with the input matters, as it does for hBox). (l, u) is swept along two lines (u = 1, l from −3 to
  0.85; l = −1, u from −0.85 to 3) on a grid of ``PROBE_POINTS`` points; ``relu_jump`` is the largest change of the
  probe's four bounds (lower and upper of both outputs) across an interval of the sweep that bisection shrank to
  2⁻⁴⁰ of a grid step around the grid's largest changes: ≈ 0 for a continuous transformer, the jump itself for a
  discontinuous one. ``continuous`` is relu_jump < ``JUMP_TOL``.
- **Continuity of the loss** (certlab's measurement on the model, ``loss_jump``): the certified loss
  L(θ) = CE(−m(θ), y) (m: the margin lower bounds) along θ + t·d, d a random direction with ‖d‖ = radius·‖θ‖,
  t ∈ [−1, 1] on a ``grid`` (in float64 by default; ``diagnose`` scans the first ``loss_n`` samples in the
  model's dtype, with 2 brackets bisected 16 times); the ``brackets`` neighbour intervals with the largest |ΔL| are bisected
  ``refine`` times, each time keeping the half with the larger change. ``loss_jump`` is the largest |ΔL| left
  across an interval of width 2/(grid − 1)·2⁻ʳᵉᶠⁱⁿᵉ: ≈ 0 where L is continuous on the scanned segment, the jump
  where a transformer switched cases inside it. A continuous relaxation always gives ≈ 0; a discontinuous one gives
  > 0 only where the segment crosses a switch whose jump the rest of the network does not hide.
- **Sensitivity** (paper §4.3): how the bound depends on the weights. IBP and hBox use only boxes and slopes 0/1,
  so their bound is piecewise linear in the pre-activation bounds of each ReLU; DeepZ, Fast-Lin, CROWN and
  CROWN-IBP use slopes u/(u − l), which make the bound a rational function of them and, through them, of the
  weights of every earlier layer (the paper's argument for their sensitivity). The paper derives this analytically
  and gives no measurement; certlab's measurement, ``relu_curv``, is the curvature of the same probe: the median
  over the sweep points where the neuron crosses zero (l < 0 < u) of |∂²bound/∂t²| / (1 + |∂bound/∂t|) (finite
  differences over t ± 1e-5 along the sweep, so that the isolated kinks and jumps of a piecewise-linear bound rarely
  fall inside a stencil; relative to the slope, so that float64 rounding in a steep bound — box-dc with a large ωF
  has slope 1 + ωF — does not read as curvature), the largest over the probe's bounds and the two sweeps.
  Piecewise linear: 0 (kinks are isolated points); rational: > 0. ``sensitive`` is relu_curv > ``CURV_TOL``.
- **Tightness**: the paper reports one scalar per relaxation (higher = tighter, e.g. IBP 0.73, hBox 1.76, DeepZ
  3.00, CROWN 3.36 on MNIST CONV) but publishes no procedure for it. certlab's own measure, ``inv_gap``, is
  1 / mean over samples and j ≠ y of (f_y(x) − f_j(x)) − m_j, the clean margin minus the relaxation's lower bound on
  it over the set (x lies in the set, so every term is ≥ 0 for a sound bound): higher = tighter, in 1/logit units,
  not comparable with the paper's numbers. ``width`` and ``lp_gap`` are two more views of tightness.

Other columns, per relaxation on the first ``n`` samples:

- ``width``: mean width u − l of the output (logit) bounds;
- ``lp_gap``: mean over ``lp_samples`` samples and the margins f_y − f_j of (LP optimum − relaxation bound), the LP
  being the triangle relaxation with CROWN intermediate bounds (≥ 0 up to solver precision for relaxations that are
  no tighter than it; negative only if a relaxation beats the LP, e.g. by tighter intermediate bounds);
- ``certified``: fraction of samples certified;
- ``unstable``: mean number of crossing ReLUs (l < 0 < u) per sample under the relaxation's own pre-activation bounds.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F

from certlab.attacks.base import eval_mode
from certlab.bounds.api import bounds, margins, resolve_method
from certlab.bounds.engine import relu_bounds
from certlab.bounds.rounding import settle
from certlab.errors import InputError
from certlab.threat import Box, ThreatSet

PROBE_POINTS = 4001  # grid points per probe sweep
PROBE_REFINE = 40  # bisections of the probe's largest changes
JUMP_TOL = 1e-6  # relu_jump above this: discontinuous (a continuous transformer leaves ≈ 1e-12 on the probe)
CURV_TOL = 1e-3  # relu_curv above this: sensitive (piecewise linear leaves float64 noise, ≈ 1e-5 here)
_RHO = 0.05  # radius of the probe's x1 (x2 takes the rest of (u − l)/2)
_K = 10.0  # offset of the probe's always-active neuron (its input stays in [K − 2, K + 2] on the sweeps)
_DELTA = 1e-5  # half-width (in t) of the curvature stencil
_SWEEPS = (((-3.0, 1.0), (0.85, 1.0)), ((-1.0, -0.85), (-1.0, 3.0)))  # ((l0, u0), (l1, u1)): segment in (l, u)


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


# -- the ReLU-transformer probe ---------------------------------------------------------------------------------
def _probe_net():
    """x = (x1, x2) -> [ReLU(x1 + x2), ReLU(x1 + x2) − x1] (the second via ReLU(x1 + K) − K = x1), in float64."""
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
        net[0].bias.copy_(torch.tensor([0.0, _K]))
        net[2].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
        net[2].bias.copy_(torch.tensor([0.0, _K]))
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def relu_probe(method: str, l, u) -> torch.Tensor:
    """[N, 4]: the relaxation's (lower, upper) bounds of ReLU(z) and of ReLU(z) − x1 on the probe network (module
    doc), for pre-activation bounds z ∈ [l, u] (float64 tensors [N]): a window on its ReLU transformer."""
    l, u = torch.as_tensor(l, dtype=torch.float64), torch.as_tensor(u, dtype=torch.float64)
    if (l > u).any():
        raise InputError("relu_probe: l must be <= u")
    if ((u - l) < 2 * _RHO).any():
        raise InputError(f"relu_probe: u - l must be >= {2 * _RHO}")
    c = (l + u) / 4
    x = torch.stack([c, c], 1)
    r = torch.stack([torch.full_like(c, _RHO), (u - l) / 2 - _RHO], 1)
    lo, hi = x - r, x + r
    with torch.no_grad():
        b = bounds(_probe_net(), x, Box(lo, hi), method)
    return torch.cat([b.lower, b.upper], 1)


def _sweep_points(seg, t):
    (l0, u0), (l1, u1) = seg
    return l0 + t * (l1 - l0), u0 + t * (u1 - u0)


def _bracket_jump(f, ts, vals, brackets, refine):
    """Largest |Δf| left after bisecting the ``brackets`` neighbour intervals of the grid ``ts`` with the largest
    change ``refine`` times (keeping the half with the larger change). f maps a [k] tensor of t to [k, m] values."""
    d = (vals[1:] - vals[:-1]).abs().amax(1)
    k = min(brackets, d.numel())
    idx = d.topk(k).indices
    a, b = ts[idx].clone(), ts[idx + 1].clone()
    fa, fb = vals[idx].clone(), vals[idx + 1].clone()
    for _ in range(refine):
        mid = (a + b) / 2
        fm = f(mid)
        left = (fm - fa).abs().amax(1) >= (fb - fm).abs().amax(1)
        b = torch.where(left, mid, b)
        fb = torch.where(left[:, None], fm, fb)
        a = torch.where(left, a, mid)
        fa = torch.where(left[:, None], fa, fm)
    return float((fb - fa).abs().amax())


@functools.lru_cache(maxsize=64)
def transformer_properties(method: str) -> dict:
    """{"relu_jump", "relu_curv", "continuous", "sensitive"} of a relaxation's ReLU transformer, measured on the
    probe (module doc). Depends on the relaxation only, not on a model."""
    method = resolve_method(method)
    jump, curv = 0.0, 0.0
    n = PROBE_POINTS
    # grid points offset by an irrational fraction of a step, so they do not sit on a lattice of round values of
    # (l, u), where box-dc's jumps and the kinks of piecewise-linear bounds lie
    ts = (torch.arange(n, dtype=torch.float64) + (math.sqrt(5) - 1) / 2) / n
    for seg in _SWEEPS:
        f = lambda t, seg=seg: relu_probe(method, *_sweep_points(seg, t))  # noqa: E731
        vals = f(ts)
        jump = max(jump, _bracket_jump(f, ts, vals, brackets=8, refine=PROBE_REFINE))
        l, u = _sweep_points(seg, ts)
        inner = ts[1:-1]  # a three-point stencil of width 2δ ≪ h at each inner grid point: a jump or kink falls
        hi, mid, lo = f(inner + _DELTA), vals[1:-1], f(inner - _DELTA)  # inside few
        slope = (hi - lo).abs() / (2 * _DELTA)
        second = (hi - 2 * mid + lo).abs() / _DELTA ** 2 / (1 + slope)
        crossing = ((l < 0) & (u > 0))[1:-1]
        if crossing.any():
            curv = max(curv, float(second[crossing].median(0).values.max()))
    return {"relu_jump": jump, "relu_curv": curv, "continuous": jump < JUMP_TOL, "sensitive": curv > CURV_TOL}


# -- the loss along a weight direction ----------------------------------------------------------------------------
def loss_jump(model, x, y, threat, method, grid: int = 21, radius: float = 0.05, seed: int = 0,
              brackets: int = 3, refine: int = 24, direction=None, float64: bool = True) -> float:
    """Largest jump of the certified loss along a segment of weight space (module doc: ``loss_jump``), computed in
    float64 unless ``float64`` is False. ``direction``: a list of tensors shaped like ``model.parameters()``
    (default: random, seeded); it is scaled to ‖d‖ = radius·‖θ‖ (radius·1 when θ = 0)."""
    if grid < 3:
        raise InputError(f"grid must be >= 3 points, got {grid}")
    if not (radius > 0 and math.isfinite(radius)):
        raise InputError(f"radius must be a finite number > 0, got {radius}")
    net = copy.deepcopy(model).eval()
    net, x64 = (net.double(), x.double()) if float64 else (net, x)
    th = _threat(threat, x64)
    params = list(net.parameters())
    if direction is None:
        gen = torch.Generator().manual_seed(seed)
        d = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in params]
    else:
        d = [torch.as_tensor(v, dtype=torch.float64).to(p) for p, v in zip(params, direction)]
        if len(d) != len(params) or any(v.shape != p.shape for p, v in zip(params, d)):
            raise InputError("direction must hold one tensor shaped like each of the model's parameters")
    norm_p = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in params)) or 1.0
    norm_d = math.sqrt(sum(float((v ** 2).sum()) for v in d))
    if norm_d == 0:
        raise InputError("direction is zero")
    scale = radius * norm_p / norm_d
    base = [p.detach().clone() for p in params]

    def loss_at(ts):
        out = []
        with torch.no_grad():
            for t in ts.tolist():
                for p, b0, v in zip(params, base, d):
                    p.copy_(b0 + t * scale * v)
                out.append(float(certified_loss(net, x64, y, th, method)))
        return torch.tensor(out, dtype=torch.float64)[:, None]

    ts = torch.linspace(-1.0, 1.0, grid, dtype=torch.float64)
    return _bracket_jump(loss_at, ts, loss_at(ts), brackets, refine)


# -- the table --------------------------------------------------------------------------------------------------
def diagnose(model, dataset, threat, relaxations=("ibp", "hbox", "crown", "deepz", "crown-ibp"), n: int = 64,
             lp_samples: int = 4, grid: int = 11, radius: float = 0.05, seed: int = 0, loss_n: int = 16) -> list:
    """One dict per relaxation with keys relaxation, width, lp_gap, certified, unstable, inv_gap, continuous,
    relu_jump, loss_jump, sensitive, relu_curv (module doc). ``dataset``: an object with ``.x``/``.y`` tensors or
    an (x, y) pair; ``threat``: a threat set or a callable x -> set. The loss scan runs on the first ``loss_n``
    samples in the model's dtype, with 2 brackets bisected 16 times (its cost: ``grid`` + 32 bound computations per
    relaxation); ``grid`` 0 skips it (loss_jump None)."""
    x, y = (dataset.x, dataset.y) if hasattr(dataset, "x") else dataset
    for name, v in (("n", n), ("loss_n", loss_n)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(grid, int) or (grid != 0 and grid < 3):
        raise InputError(f"grid must be 0 (no loss scan) or an integer >= 3, got {grid!r}")
    x, y = x[:n], y[:n].long()
    names = [resolve_method(r) for r in relaxations]
    if not names:
        raise InputError("give at least one relaxation")
    th = _threat(threat, x)
    k_loss = min(loss_n, x.shape[0])
    th_loss = th.subset(x, torch.arange(k_loss, device=x.device))
    with eval_mode(model):
        lp_m = None
        if lp_samples > 0:
            from certlab.train.threats import batch_threat
            from certlab.verify.lp import lp_margins

            k = min(lp_samples, x.shape[0])
            lp_m = lp_margins(model, x[:k], y[:k], batch_threat(th, x[:k], torch.arange(k)))
        with torch.no_grad():
            logits = model(x)
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
            clean = logits.gather(1, y[:, None]) - logits  # f_y − f_j at x
            gap = float((clean - mg)[off].mean())
            row = {"relaxation": m, "width": float((b.upper - b.lower).mean()),
                   "lp_gap": None, "certified": float(cert.float().mean()),
                   "unstable": float(unstable.mean()) if torch.is_tensor(unstable) else 0.0,
                   "inv_gap": 1.0 / gap if gap > 0 else None}  # None: bounds exact at x (no gap)
            if lp_m is not None:
                k = lp_m.shape[0]
                solved = off[:k] & torch.isfinite(lp_m)  # an LP that hit its time limit gives −inf: left out
                row["lp_gap"] = float((lp_m - mg[:k])[solved].mean()) if solved.any() else None
            props = transformer_properties(m)
            row["continuous"] = props["continuous"]
            row["relu_jump"] = props["relu_jump"]
            row["loss_jump"] = (loss_jump(model, x[:k_loss], y[:k_loss], th_loss, m, grid, radius, seed, brackets=2,
                                          refine=16, float64=False) if grid else None)
            row["sensitive"] = props["sensitive"]
            row["relu_curv"] = props["relu_curv"]
            rows.append(row)
    return rows


COLUMNS = (("relaxation", "relaxation"), ("width", "width"), ("lp_gap", "LP gap"), ("certified", "certified"),
           ("unstable", "unstable"), ("inv_gap", "1/gap"), ("continuous", "continuous"), ("relu_jump", "relu jump"),
           ("loss_jump", "loss jump"), ("sensitive", "sensitive"), ("relu_curv", "relu curv"))


def format_rows(rows: list, title: str | None = None) -> str:
    keys = [k for k, _ in COLUMNS]
    head = [h for _, h in COLUMNS]

    def cell(k, v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
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
