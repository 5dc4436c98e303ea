"""Threat sets: the input regions a network must be robust on.

Every set is centred at a batch of points ``x`` of shape ``[B, *input_shape]`` and offers:

- ``concretize(A, x)``: lower/upper of ``A·x'`` over ``x'`` in the set, for ``A`` of shape ``[B, S, *input_shape]``
  (the *support function* of the set; every linear relaxation ends here);
- ``interval_hull(x)``: the tightest box ``[lo, hi]`` containing the set;
- ``project(z, x)``: a point of the set (exactly the Euclidean projection for the balls, the nearest segment point
  for ``SegmentUnion``);
- ``sample(x, n)``: ``n`` random points of the set, shape ``[n, B, *input_shape]``;
- ``validate(x)``: raise :class:`certlab.InputError` on NaN/inf, a batch-size mismatch of ``eps``, or ``x`` outside the
  domain.

and what the rest of certlab asks of a set, so no other module branches on its kind: ``eps_vector`` (per-sample ε),
``ascent(g)`` (steepest-ascent direction for attacks), ``argmin(a, x)`` (a minimiser of a·x'), ``prefix(x)`` (exact
bounds on the network's linear prefix, for IBP), ``concretize_rows`` (the support function for rows given only through
products, for patches), ``milp_input`` (the LP/MILP encoding), ``take``/``subset``/``single`` (per-sample slicing) and
the flags ``is_box`` (the set is its interval hull), ``gradient_attacks`` (PGD/APGD apply; else the exact line
search), ``needs_cuts`` (the LP/MILP encoding is an outer box refined by cutting planes) and ``support_by_maps``.

``eps`` is a float or a 1-D tensor with one radius per sample. ``domain=(lo, hi)`` intersects the set with that box
(``None``: no clipping). :func:`make` builds a set from a norm's name.
"""

from __future__ import annotations

import math

import torch

from certlab.errors import InputError
from certlab.tensorops import bdot

_DOMAIN_TOL = 1e-6


def _check_eps(eps) -> float | torch.Tensor:
    if isinstance(eps, torch.Tensor):
        if eps.dim() > 1:
            raise InputError(f"eps must be a float or a 1-D tensor (one radius per sample), got shape {tuple(eps.shape)}")
        e = eps.detach()
        if not torch.isfinite(e).all():
            raise InputError("eps contains NaN or inf")
        if (e < 0).any():
            raise InputError(f"eps must be >= 0, got min {e.min().item():g}")
        if eps.dim() == 0:
            return float(eps)
        # a float64 radius stays float64: rounding it to float32 here could shrink the set the caller asked about
        return eps if eps.dtype in (torch.float32, torch.float64) else eps.float()
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise InputError(f"eps must be a number or a tensor, got {type(eps).__name__}") from None
    if not math.isfinite(eps):
        raise InputError(f"eps must be finite, got {eps}")
    if eps < 0:
        raise InputError(f"eps must be >= 0, got {eps}")
    return eps


def _centre_radius(lo, hi):
    c = torch.lerp(lo, hi, 0.5)
    return c, hi - c


def _check_domain(domain):
    if domain is None:
        return None
    try:
        lo, hi = float(domain[0]), float(domain[1])
    except (TypeError, ValueError, IndexError):
        raise InputError(f"domain must be None or a pair (lo, hi), got {domain!r}") from None
    if not lo < hi:
        raise InputError(f"domain must have lo < hi, got {domain!r}")
    return (lo, hi)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(max(v, tiny)): at most √tiny (1e-19 in float32) above sqrt(max(v, 0)), so still an upper bound, with a
    finite gradient everywhere (0 below tiny; the derivative of √· at 0 is infinite and made NaN gradients)."""
    return v.clamp_min(torch.finfo(v.dtype).tiny).sqrt()


class _Prefix:
    """Bounds on the linear prefix of a network (the nodes before any ReLU) straight from the set, for IBP.

    The graph walker calls ``affine(i, j, op)`` / ``add(i, a, b)`` per prefix node in order, then ``bounds(i,
    shape)``: (lower, upper) of node i over the set, or None when the interval hull already gives them (box sets)."""

    def affine(self, i, j, op):
        pass

    def add(self, i, a, b):
        pass

    def bounds(self, i, shape):
        return None


class _CentrePrefix(_Prefix):
    def __init__(self, x):
        self.vals = {0: x}

    def affine(self, i, j, op):
        self.vals[i] = op.fwd(self.vals[j])

    def add(self, i, a, b):
        self.vals[i] = self.vals[a] + self.vals[b]


class _L2Prefix(_CentrePrefix):
    """z(x) ± ε·ρ, with ρ an upper bound on the ℓ2 norm of each row of the prefix map: exact through per-channel
    scalings and the first mixing layer (ρ' = sqrt((W∘W) ρ²)), then by the triangle inequality (ρ' = |W| ρ)."""

    def __init__(self, x, eps):
        super().__init__(x)
        self.rho = {0: torch.ones((1, *x.shape[1:]), device=x.device, dtype=x.dtype)}
        self.diag = {0: True}
        self.eps = eps

    def affine(self, i, j, op):
        super().affine(i, j, op)
        self.rho[i] = _safe_sqrt(op.sqfwd(self.rho[j] * self.rho[j])) if self.diag[j] else op.absfwd(self.rho[j])
        self.diag[i] = self.diag[j] and op.diagonal

    def add(self, i, a, b):
        super().add(i, a, b)
        self.rho[i] = self.rho[a] + self.rho[b]
        self.diag[i] = False

    def bounds(self, i, shape):
        e = self.eps.reshape(self.eps.shape[0], *([1] * len(shape)))
        return self.vals[i] - e * self.rho[i], self.vals[i] + e * self.rho[i]


class _SegmentPrefix(_CentrePrefix):
    """The k directions pushed through the prefix, exactly: z(x) + max_j max_β β·(L d_j)."""

    def __init__(self, x, d, blo, bhi):
        super().__init__(x)
        self.B, self.k = d.shape[:2]
        self.dirs = {0: d.reshape(self.B * self.k, *x.shape[1:])}
        self.blo, self.bhi = blo.unsqueeze(-1), bhi.unsqueeze(-1)

    def affine(self, i, j, op):
        super().affine(i, j, op)
        self.dirs[i] = op.lin(self.dirs[j])

    def add(self, i, a, b):
        super().add(i, a, b)
        self.dirs[i] = self.dirs[a] + self.dirs[b]

    def bounds(self, i, shape):
        p = self.dirs[i].reshape(self.B, self.k, -1)
        lo = torch.min(p * self.blo, p * self.bhi).min(1).values.reshape(self.B, *shape)
        hi = torch.max(p * self.blo, p * self.bhi).max(1).values.reshape(self.B, *shape)
        return self.vals[i] + lo, self.vals[i] + hi


class ThreatSet:
    """Base class. Subclasses set ``norm`` (a short name: "linf", "l2", "segments", "box") and the flags below."""

    norm: str = ""
    is_box: bool = False  # the set equals its interval hull (box fast paths, exact box concretisation)
    gradient_attacks: bool = True  # PGD/APGD steps with ``ascent``; False: attacks run the exact line search
    needs_cuts: bool = False  # the LP/MILP encoding is the interval hull, refined by cutting planes (``project``)
    support_by_maps: bool = True  # concretize_rows reads rows only through products with maps shaped like x
    needs_directions: bool = False  # :func:`make` must be given directions

    def __init__(self, eps, domain=(0.0, 1.0)):
        self.eps = _check_eps(eps)
        self.domain = _check_domain(domain)

    # -- helpers -------------------------------------------------------------------------------------------
    def eps_vector(self, x: torch.Tensor) -> torch.Tensor:
        """eps as a tensor of shape [B] on x's device/dtype."""
        B = x.shape[0]
        if isinstance(self.eps, torch.Tensor):
            if self.eps.shape[0] != B:
                raise InputError(f"eps has {self.eps.shape[0]} radii but the batch has {B} samples")
            return self.eps.to(device=x.device, dtype=x.dtype)
        return torch.full((B,), self.eps, device=x.device, dtype=x.dtype)

    def eps_view(self, x: torch.Tensor) -> torch.Tensor:
        """eps shaped [B, 1, ..., 1] to broadcast against x."""
        return self.eps_vector(x).view(-1, *([1] * (x.dim() - 1)))

    def with_eps(self, eps) -> "ThreatSet":
        """The same kind of set with another radius (used by radius search and schedules)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.eps = _check_eps(eps)
        return new

    def take(self, x: torch.Tensor, idx) -> "ThreatSet":
        """The set for the batch ``x`` = rows ``idx`` of a data set whose per-sample data (radii, directions,
        bounds) the set holds; data already sized to the batch, or shared, stays."""
        if isinstance(self.eps, torch.Tensor) and self.eps.shape[0] != x.shape[0]:
            return self.with_eps(self.eps[idx])
        return self

    def subset(self, x: torch.Tensor, idx: torch.Tensor) -> "ThreatSet":
        """The same set for the samples ``x[idx]`` only: per-sample radii (and per-sample segment directions) follow."""
        if isinstance(self.eps, torch.Tensor):
            self.eps_vector(x)  # raises on a batch-size mismatch
            return self.with_eps(self.eps[idx.to(self.eps.device)])
        return self

    def single(self, x: torch.Tensor, b: int) -> "ThreatSet":
        """The set around x[b] alone, valid for any batch of copies of x[b] (scalar eps, shared per-sample data)."""
        eps = self.subset(x, torch.tensor([b], device=x.device)).eps
        eps = float(eps[0]) if isinstance(eps, torch.Tensor) else eps  # the radius as given (a float64 one is kept)
        return self.with_eps(eps)

    # -- what bounds, attacks and verification ask of a set ------------------------------------------------------
    def ascent(self, g: torch.Tensor) -> torch.Tensor:
        """Steepest-ascent direction of unit dual norm for the gradient g [B, …] (one attack step is ε-scaled)."""
        raise InputError(f"gradient attacks do not support {type(self).__name__}")

    def argmin(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A minimiser over the set of a·x' per sample (a shaped like x)."""
        raise NotImplementedError

    def prefix(self, x: torch.Tensor) -> _Prefix:
        """Bounds on the network's linear prefix straight from the set (see :class:`_Prefix`); none for boxes."""
        return _Prefix()

    def concretize_rows(self, rows, x: torch.Tensor, lower_only: bool = False):
        """:meth:`concretize` for rows given only through ``rows.dot(t)`` and ``rows.absdot(t)`` (products with
        maps t shaped like x), ``rows.norm()`` (ℓ2 norms of the rows; used where ``support_by_maps`` is False) and
        ``rows.lead`` (the shape that broadcasts a per-sample scalar against the results). Upper is None with
        ``lower_only``."""
        raise NotImplementedError

    def milp_input(self, enc, x: torch.Tensor, b: int, integral: bool = True):
        """Add the input variables of sample b to the empty encoding ``enc`` (``new_vars``, ``add_rows``; they
        are its first variables); return (M, c): the input point as ``M·v + c`` (scipy sparse M over the variables
        so far, numpy c)."""
        raise InputError(f"no MILP encoding for threat sets of kind {type(self).__name__}")

    def _box_input(self, enc, x, b):
        import numpy as np
        import scipy.sparse as sp

        lo, hi = self.interval_hull(x)
        n_in = x[b].numel()
        idx = enc.new_vars(lo[b].detach().double().cpu().numpy().ravel(), hi[b].detach().double().cpu().numpy().ravel())
        M0 = sp.csr_matrix((np.ones(n_in), (np.arange(n_in), idx)), shape=(n_in, enc.n))
        return M0, np.zeros(n_in)

    def _box_rows(self, rows, x, lower_only):
        lo, hi = self.interval_hull(x)
        c = rows.dot((lo + hi) / 2)
        r = rows.absdot((hi - lo) / 2)
        return c - r, None if lower_only else c + r

    def validate(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise InputError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"x must be a floating-point tensor, got {x.dtype}")
        # one pass over x: aminmax propagates NaN into both results, and ±inf shows in one of them
        mn, mx = (v.item() for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
        if not (math.isfinite(mn) and math.isfinite(mx)):
            raise InputError("x contains NaN or inf")
        if isinstance(self.eps, torch.Tensor) and self.eps.shape[0] != x.shape[0]:
            self.eps_vector(x)  # raises, naming both sizes
        if self.domain is not None and x.numel():
            lo, hi = self.domain
            if mn < lo - _DOMAIN_TOL or mx > hi + _DOMAIN_TOL:
                raise InputError(
                    f"x lies outside the domain [{lo:g}, {hi:g}] (min {mn:g}, max {mx:g}); "
                    "pass domain=None to disable clipping"
                )

    def _box(self, x, inplace=False):
        """The box hull of the ball alone, clipped to the domain (``inplace``: clipped in place, for callers that
        record no gradient)."""
        e = self.eps if isinstance(self.eps, float) else self.eps_view(x)
        lo, hi = x - e, x + e
        if self.domain is not None:
            lo = lo.clamp_(min=self.domain[0]) if inplace else lo.clamp(min=self.domain[0])
            hi = hi.clamp_(max=self.domain[1]) if inplace else hi.clamp(max=self.domain[1])
        return lo, hi

    @staticmethod
    def box_concretize(A, lo, hi):
        """(min, max) of A·x' over the box [lo, hi] per row: A [B, S, …]; lo, hi [B, …] with as many entries per
        sample as a row of A has."""
        B, S = A.shape[:2]
        mid = ((lo + hi) / 2).reshape(lo.shape[0], -1)
        rad = ((hi - lo) / 2).reshape(lo.shape[0], -1)
        Af = A.reshape(B, S, -1)
        c = bdot(Af, mid)
        r = bdot(Af.abs(), rad)
        return c - r, c + r

    # -- interface --------------------------------------------------------------------------------------------
    def concretize(self, A: torch.Tensor, x: torch.Tensor):
        raise NotImplementedError

    def interval_hull(self, x: torch.Tensor):
        return self._box(x)

    def centre_radius(self, x: torch.Tensor):
        """(c, r) of the interval hull [c − r, c + r] as fresh tensors (callers may overwrite them): c = lerp(lo, hi,
        ½), r = hi − c. For the clipped box: two new tensors and four in-place passes instead of six new tensors,
        when no gradient is recorded through x or ε."""
        if torch.is_grad_enabled() and (x.requires_grad or getattr(self.eps, "requires_grad", False)):
            return _centre_radius(*self._box(x))
        lo, hi = self._box(x, inplace=True)
        c = lo.lerp_(hi, 0.5)
        return c, hi.sub_(c)

    def project(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def contains(self, z: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """BoolTensor [B]: z[i] lies in the set around x[i] (up to tol)."""
        raise NotImplementedError

    def __repr__(self):
        e = self.eps if not isinstance(self.eps, torch.Tensor) else f"tensor[{self.eps.shape[0]}]"
        return f"{type(self).__name__}(eps={e}, domain={self.domain})"


class _BoxSet(ThreatSet):
    """A set that is its own interval hull ``[lo, hi] = _box(x)``: concretisation is exact, A·m ± |A|·r."""

    is_box = True

    def concretize(self, A, x):
        lo, hi = self._box(x)
        return self.box_concretize(A, lo, hi)

    def concretize_rows(self, rows, x, lower_only=False):
        return self._box_rows(rows, x, lower_only)

    def milp_input(self, enc, x, b, integral=True):
        return self._box_input(enc, x, b)

    def ascent(self, g):
        return g.sign()

    def argmin(self, a, x):
        lo, hi = self._box(x)
        return torch.where(a > 0, lo, hi)

    def project(self, z, x):
        lo, hi = self._box(x)
        return torch.max(torch.min(z, hi), lo)

    def sample(self, x, n, generator=None):
        lo, hi = self._box(x)
        u = torch.rand((n, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        return lo + u * (hi - lo)

    def vertices(self, x, n, generator=None):
        """n random vertices of the box (the extreme points where ReLU-network bounds are usually attained)."""
        lo, hi = self._box(x)
        s = torch.rand((n, *x.shape), generator=generator, device=x.device) < 0.5
        return torch.where(s, hi, lo)

    def contains(self, z, x, tol=1e-5):
        lo, hi = self._box(x)
        B = x.shape[0]
        return ((z >= lo - tol) & (z <= hi + tol)).reshape(B, -1).all(1)


class LinfBall(_BoxSet):
    """{x' : ‖x' − x‖∞ ≤ ε} ∩ domain — a box, so concretisation is exact: A·m ± |A|·r."""

    norm = "linf"


class Box(_BoxSet):
    """{x' : lower ≤ x' ≤ upper} (∩ domain): per-feature bounds, one box per sample.

    ``lower``/``upper`` have the shape of the batch x ``[B, *input_shape]`` (or ``[1, *input_shape]``: one box
    shared by every sample); each x must lie inside its box (e.g. its centre). The per-sample ε (attack step sizes)
    is the box's ℓ∞ radius, half its widest side. Adding this set to certlab was this one class.
    """

    norm = "box"

    def __init__(self, lower, upper, domain=None):
        if not isinstance(lower, torch.Tensor) or not isinstance(upper, torch.Tensor):
            raise InputError("Box lower and upper must be tensors shaped like the batch x")
        if lower.shape != upper.shape or lower.dim() < 2:
            raise InputError(f"Box lower {tuple(lower.shape)} and upper {tuple(upper.shape)} must have the same shape "
                             "[B, *input_shape]")
        lower, upper = lower.detach(), upper.detach()
        if not (torch.isfinite(lower).all() and torch.isfinite(upper).all()):
            raise InputError("Box bounds contain NaN or inf")
        if (lower > upper).any():
            raise InputError(f"Box has lower > upper at {int((lower > upper).sum())} feature(s)")
        self.domain = _check_domain(domain)
        dt = lambda t: t if t.dtype == torch.float64 else t.float()  # noqa: E731
        self.lower, self.upper = dt(lower), dt(upper)
        self._cast = {}
        self.eps = (self.upper - self.lower).reshape(lower.shape[0], -1).amax(1) / 2

    def _bounds(self, x):
        key = (x.device, x.dtype)
        if key not in self._cast:  # rounded outwards when x has less precision: the box never shrinks
            lo, hi = self.lower.to(device=x.device, dtype=x.dtype), self.upper.to(device=x.device, dtype=x.dtype)
            if x.dtype != self.lower.dtype:
                inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
                lo = torch.where(lo.to(self.lower.dtype) > self.lower.to(x.device), torch.nextafter(lo, -inf), lo)
                hi = torch.where(hi.to(self.upper.dtype) < self.upper.to(x.device), torch.nextafter(hi, inf), hi)
            self._cast = {key: (lo, hi)}
        lo, hi = self._cast[key]
        if lo.shape[1:] != x.shape[1:] or lo.shape[0] not in (1, x.shape[0]):
            raise InputError(f"Box bounds have shape {tuple(lo.shape)} but x has {tuple(x.shape)}")
        return lo.expand(x.shape), hi.expand(x.shape)

    def _box(self, x, inplace=False):
        lo, hi = self._bounds(x)
        if self.domain is not None:
            lo, hi = lo.clamp(min=self.domain[0]), hi.clamp(max=self.domain[1])
        return lo, hi

    def centre_radius(self, x):
        return _centre_radius(*self._box(x))

    def eps_vector(self, x):
        e = self.eps.to(device=x.device, dtype=x.dtype)
        if e.shape[0] not in (1, x.shape[0]):
            raise InputError(f"Box has {e.shape[0]} boxes but the batch has {x.shape[0]} samples")
        return e.expand(x.shape[0])

    def with_eps(self, eps):
        raise InputError("a Box has fixed bounds and no radius to change; use LinfBall/L2Ball for radius searches")

    def take(self, x, idx):
        if self.lower.shape[0] in (1, x.shape[0]):
            return self
        return self._rows(idx)

    def _rows(self, idx):
        i = idx.to(self.lower.device) if isinstance(idx, torch.Tensor) else idx
        return Box(self.lower[i], self.upper[i], self.domain)

    def subset(self, x, idx):
        self.eps_vector(x)  # raises on a batch-size mismatch
        return self if self.lower.shape[0] == 1 else self._rows(idx)

    def single(self, x, b):
        self.eps_vector(x)
        return self if self.lower.shape[0] == 1 else Box(self.lower[b:b + 1], self.upper[b:b + 1], self.domain)

    def validate(self, x):
        super().validate(x)
        lo, hi = self._bounds(x)
        if ((x < lo - _DOMAIN_TOL) | (x > hi + _DOMAIN_TOL)).any():
            raise InputError("x lies outside its Box (each x must lie inside its box, e.g. at its centre)")
        if self.domain is not None and ((hi < self.domain[0]) | (lo > self.domain[1])).any():
            raise InputError(f"a Box does not meet the domain [{self.domain[0]:g}, {self.domain[1]:g}]")

    def __repr__(self):
        return f"Box(lower[{tuple(self.lower.shape)}], upper, domain={self.domain})"


class L2Ball(ThreatSet):
    """{x' : ‖x' − x‖₂ ≤ ε} ∩ domain.

    Concretisation takes the tighter of the ball bound A·x ± ε‖A‖₂ and the bound over the domain-clipped box hull;
    both contain the set, so their intersection is sound.
    """

    norm = "l2"
    needs_cuts = True
    support_by_maps = False

    def concretize(self, A, x):
        B, S = A.shape[:2]
        Af = A.reshape(B, S, -1)
        c = bdot(Af, x.reshape(B, -1))
        r = Af.norm(dim=-1) * self.eps_vector(x).view(B, 1)
        lo_ball, hi_ball = c - r, c + r
        if self.domain is None:
            return lo_ball, hi_ball
        lo_box, hi_box = self.box_concretize(A, *self._box(x))
        return torch.max(lo_ball, lo_box), torch.min(hi_ball, hi_box)

    def concretize_rows(self, rows, x, lower_only=False):
        centre = rows.dot(x)
        rad = rows.norm() * self.eps_vector(x).view(rows.lead)
        ball = (centre - rad, None if lower_only else centre + rad)
        if self.domain is None:
            return ball
        box = self._box_rows(rows, x, lower_only)
        return torch.max(ball[0], box[0]), None if lower_only else torch.min(ball[1], box[1])

    def milp_input(self, enc, x, b, integral=True):
        return self._box_input(enc, x, b)  # the ball itself: tangent cuts (needs_cuts)

    def ascent(self, g):
        n = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        return g / n.view(-1, *([1] * (g.dim() - 1)))

    def argmin(self, a, x):
        return self.project(x - self.eps_view(x) * self.ascent(a), x)

    def prefix(self, x):
        return _L2Prefix(x, self.eps_vector(x))

    def project(self, z, x, iters: int = 40):
        """Exact Euclidean projection onto ball ∩ box: p(λ) = clip((z + λx)/(1 + λ)), λ ≥ 0 found by bisection."""
        B = x.shape[0]
        e = self.eps_vector(x)
        clip = (lambda t: t.clamp(self.domain[0], self.domain[1])) if self.domain is not None else (lambda t: t)
        view = (-1,) + (1,) * (x.dim() - 1)
        p0 = clip(z)
        d0 = (p0 - x).reshape(B, -1).norm(dim=1)
        if bool((d0 <= e).all()):
            return p0
        # fast path: when the projection onto the ball already lies in the box it is the projection onto ball ∩ box
        dz = (z - x).reshape(B, -1).norm(dim=1)
        pb = x + (z - x) * torch.where(dz > e, e / dz.clamp_min(1e-30), torch.ones_like(dz)).view(view)
        if self.domain is None or bool(((pb >= self.domain[0]) & (pb <= self.domain[1])).all()):
            return pb
        lam_lo = torch.zeros(B, device=x.device, dtype=x.dtype)
        lam_hi = torch.ones(B, device=x.device, dtype=x.dtype)

        def dist(lam):
            lv = lam.view(view)
            return (clip((z + lv * x) / (1 + lv)) - x).reshape(B, -1).norm(dim=1)

        for _ in range(60):  # grow the bracket
            too_far = dist(lam_hi) > e
            if not too_far.any():
                break
            lam_hi = torch.where(too_far, lam_hi * 4, lam_hi)
        for _ in range(iters):
            mid = (lam_lo + lam_hi) / 2
            far = dist(mid) > e
            lam_lo = torch.where(far, mid, lam_lo)
            lam_hi = torch.where(far, lam_hi, mid)
        lv = lam_hi.view(view)
        p = clip((z + lv * x) / (1 + lv))
        # exact feasibility despite rounding: shrink towards x if needed (x is feasible, the set is convex)
        d = (p - x).reshape(B, -1).norm(dim=1)
        scale = torch.where(d > e, e / d.clamp_min(1e-30), torch.ones_like(d)).view(view)
        p = x + (p - x) * scale
        p = torch.where((d0 <= e).view(view), p0, p)
        return p

    def sample(self, x, n, generator=None):
        B = x.shape[0]
        g = torch.randn((n, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
        g = g / g.reshape(n, B, -1).norm(dim=-1).clamp_min(1e-12).view(n, B, *([1] * (x.dim() - 1)))
        d = x[0].numel()
        rad = torch.rand((n, B), generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
        pts = x.unsqueeze(0) + g * (rad * self.eps_vector(x)).view(n, B, *([1] * (x.dim() - 1)))
        if self.domain is not None:  # clipping towards x keeps points inside the ball
            pts = pts.clamp(self.domain[0], self.domain[1])
        return pts

    def contains(self, z, x, tol=1e-5):
        B = x.shape[0]
        ok = (z - x).reshape(B, -1).norm(dim=1) <= self.eps_vector(x) + tol
        if self.domain is not None:
            ok &= ((z >= self.domain[0] - tol) & (z <= self.domain[1] + tol)).reshape(B, -1).all(1)
        return ok


class SegmentUnion(ThreatSet):
    """⋃_j {x + β·d_j : |β| ≤ ε} (∩ domain): k segments along unit directions d_j.

    ``directions``: ``[k, *input_shape]`` shared by the batch, or ``[B, k, *input_shape]`` per sample (e.g. the
    radial signal direction of each point). Each direction is normalised to unit ℓ2 norm. The support function of a
    linear map a over the set is ``a·x + max_j max_{β∈[β⁻_j, β⁺_j]} β·(a·d_j)``, which is ``|a·d_j|·ε`` without a
    domain. With a domain, each segment is cut to the β-interval that stays in the box.
    """

    norm = "segments"
    gradient_attacks = False
    needs_directions = True

    def __init__(self, directions: torch.Tensor, eps, domain=None):
        super().__init__(eps, domain)
        if not isinstance(directions, torch.Tensor) or directions.dim() < 2:
            raise InputError("directions must be a tensor [k, *input_shape] or [B, k, *input_shape]")
        if not torch.isfinite(directions).all():
            raise InputError("directions contain NaN or inf")
        # float64 directions stay float64 (the set the caller means); others are held as float32
        self._raw = directions.detach() if directions.dtype == torch.float64 else directions.detach().float()

    # directions resolved against a batch x: [B, k, n] with unit rows
    def directions_for(self, x: torch.Tensor) -> torch.Tensor:
        d = self._raw.to(device=x.device, dtype=x.dtype)
        B, n = x.shape[0], x[0].numel()
        if d.dim() == x.dim():  # [k, *in]
            if tuple(d.shape[1:]) != tuple(x.shape[1:]):
                raise InputError(f"directions have shape {tuple(d.shape[1:])} per direction but x has {tuple(x.shape[1:])}")
            d = d.reshape(1, d.shape[0], n).expand(B, -1, -1)
        elif d.dim() == x.dim() + 1:  # [B, k, *in]
            if d.shape[0] != B or tuple(d.shape[2:]) != tuple(x.shape[1:]):
                raise InputError(f"per-sample directions have shape {tuple(d.shape)}, expected [{B}, k, {tuple(x.shape[1:])}]")
            d = d.reshape(B, d.shape[1], n)
        else:
            raise InputError(f"directions of shape {tuple(d.shape)} do not fit x of shape {tuple(x.shape)}")
        norms = d.norm(dim=-1, keepdim=True)
        if (norms < 1e-12).any():
            raise InputError("a segment direction has zero norm")
        return d / norms

    def beta_range(self, x: torch.Tensor):
        """[B, k] lower/upper β of each segment after cutting it to the domain."""
        d = self.directions_for(x)
        e = self.eps_vector(x).view(-1, 1)
        blo = -e.expand(-1, d.shape[1]).clone()
        bhi = e.expand(-1, d.shape[1]).clone()
        if self.domain is None:
            return blo, bhi
        lo, hi = self.domain
        xf = x.reshape(x.shape[0], 1, -1)
        # constraint lo <= x_i + β d_i <= hi per coordinate
        pos, neg = d > 1e-12, d < -1e-12
        big = torch.full_like(d, float("inf"))
        up = torch.where(pos, (hi - xf) / d.where(pos, torch.ones_like(d)), torch.where(neg, (lo - xf) / d.where(neg, -torch.ones_like(d)), big))
        dn = torch.where(pos, (lo - xf) / d.where(pos, torch.ones_like(d)), torch.where(neg, (hi - xf) / d.where(neg, -torch.ones_like(d)), -big))
        bhi = torch.min(bhi, up.min(-1).values).clamp_min(0)
        blo = torch.max(blo, dn.max(-1).values).clamp_max(0)
        return blo, bhi

    def concretize(self, A, x):
        B, S = A.shape[:2]
        Af = A.reshape(B, S, -1)
        c = bdot(Af, x.reshape(B, -1))
        d = self.directions_for(x)  # [B, k, n]
        ad = torch.bmm(Af, d.transpose(1, 2))  # [B, S, k]
        blo, bhi = self.beta_range(x)
        blo, bhi = blo.unsqueeze(1), bhi.unsqueeze(1)
        hi_val = torch.max(ad * blo, ad * bhi).max(-1).values
        lo_val = torch.min(ad * blo, ad * bhi).min(-1).values
        return c + lo_val, c + hi_val

    def concretize_rows(self, rows, x, lower_only=False):
        centre = rows.dot(x)
        d = self.directions_for(x)  # [B, k, n]
        k = d.shape[1]
        ad = torch.stack([rows.dot(d[:, j].reshape(x.shape)) for j in range(k)], -1)
        blo, bhi = self.beta_range(x)
        ends = (ad * blo.view(*rows.lead, k), ad * bhi.view(*rows.lead, k))
        low = centre + torch.min(*ends).min(-1).values
        return low, None if lower_only else centre + torch.max(*ends).max(-1).values

    def argmin(self, a, x):
        B = x.shape[0]
        d = self.directions_for(x)  # [B, k, n]
        ad = torch.einsum("nk,njk->nj", a.reshape(B, -1), d)
        blo, bhi = self.beta_range(x)
        v_lo, v_hi = ad * blo, ad * bhi
        use_hi = v_hi < v_lo
        j = torch.where(use_hi, v_hi, v_lo).argmin(1)
        beta = torch.where(use_hi, bhi, blo).gather(1, j.view(-1, 1)).squeeze(1)
        return self.points(x, j, beta)

    def prefix(self, x):
        return _SegmentPrefix(x, self.directions_for(x), *self.beta_range(x))

    def milp_input(self, enc, x, b, integral=True):
        """β_j − β⁺_j s_j ≤ 0 ≤ β_j − β⁻_j s_j, Σ s_j = 1 (s binary): the point x + Σ β_j d_j on one segment."""
        import numpy as np
        import scipy.sparse as sp

        d = self.directions_for(x)[b].detach().double().cpu().numpy()  # [k, n]
        blo, bhi = (t[b].detach().double().cpu().numpy() for t in self.beta_range(x))
        k = d.shape[0]
        enc.new_vars(np.minimum(blo, 0), np.maximum(bhi, 0))
        enc.new_vars(np.zeros(k), np.ones(k), integer=integral)
        eye = sp.identity(k, format="csr")
        A_hi = sp.hstack([eye, -sp.diags(bhi)])
        A_lo = sp.hstack([eye, -sp.diags(blo)])
        ones = sp.csr_matrix(np.concatenate([np.zeros(k), np.ones(k)])[None])
        enc.add_rows(sp.vstack([A_hi, A_lo, ones]),  # over the variables β (0..k-1) and s (k..2k-1)
                     np.concatenate([np.full(k, -np.inf), np.zeros(k), [1.0]]),
                     np.concatenate([np.zeros(k), np.full(k, np.inf), [1.0]]))
        M0 = sp.csr_matrix(np.hstack([d.T, np.zeros((d.shape[1], k))]))
        return M0, x[b].detach().double().cpu().numpy().ravel().copy()

    def centre_radius(self, x):
        return _centre_radius(*self.interval_hull(x))

    def interval_hull(self, x):
        d = self.directions_for(x)
        blo, bhi = self.beta_range(x)
        ends = torch.stack([d * blo.unsqueeze(-1), d * bhi.unsqueeze(-1)], 0)  # [2, B, k, n]
        lo = ends.amin(dim=(0, 2)).clamp_max(0).reshape(x.shape) + x
        hi = ends.amax(dim=(0, 2)).clamp_min(0).reshape(x.shape) + x
        return lo, hi

    def points(self, x: torch.Tensor, j: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """x + β·d_j for index tensor j [B] and β [B]."""
        d = self.directions_for(x)
        dj = d[torch.arange(x.shape[0], device=x.device), j]
        return x + (beta.view(-1, 1) * dj).reshape(x.shape)

    def project(self, z, x):
        B = x.shape[0]
        d = self.directions_for(x)
        diff = (z - x).reshape(B, 1, -1)
        beta = (diff * d).sum(-1)
        blo, bhi = self.beta_range(x)
        beta = torch.max(torch.min(beta, bhi), blo)
        dist = (diff - beta.unsqueeze(-1) * d).norm(dim=-1)
        j = dist.argmin(dim=1)
        return self.points(x, j, beta.gather(1, j.view(-1, 1)).squeeze(1))

    def sample(self, x, n, generator=None):
        B = x.shape[0]
        d = self.directions_for(x)
        k = d.shape[1]
        blo, bhi = self.beta_range(x)
        j = torch.randint(0, k, (n, B), generator=generator, device=x.device)
        u = torch.rand((n, B), generator=generator, device=x.device, dtype=x.dtype)
        lo = blo.gather(1, j.T).T
        hi = bhi.gather(1, j.T).T
        beta = lo + u * (hi - lo)
        dj = d[torch.arange(B, device=x.device).view(1, B), j]  # [n, B, nin]
        return x.unsqueeze(0) + (beta.unsqueeze(-1) * dj).reshape(n, *x.shape)

    def take(self, x, idx):
        out = super().take(x, idx)
        if self._raw.dim() == x.dim() + 1 and self._raw.shape[0] != x.shape[0]:  # per-sample directions
            out = type(self)(self._raw[idx], out.eps, domain=self.domain)
        return out

    def subset(self, x, idx):
        out = super().subset(x, idx)
        if self._raw.dim() == x.dim() + 1:  # per-sample directions
            out = type(self)(self._raw[idx.to(self._raw.device)], out.eps, self.domain)
        return out

    def single(self, x, b):
        eps = ThreatSet.single(self, x, b).eps
        d = self._raw[b] if self._raw.dim() == x.dim() + 1 else self._raw  # as given (normalised again)
        return type(self)(d, eps, self.domain)

    def num_directions(self, x: torch.Tensor) -> int:
        return self.directions_for(x).shape[1]

    def contains(self, z, x, tol=1e-5):
        return ((self.project(z, x) - z).reshape(x.shape[0], -1).norm(dim=1) <= tol)


KINDS = {"linf": LinfBall, "l2": L2Ball, "segments": SegmentUnion}


def kind(norm: str) -> type:
    """The threat-set class of a norm's name (as runs and the CLI name them)."""
    if norm not in KINDS:
        raise InputError(f"unknown norm {norm!r}; choose one of {', '.join(KINDS)}")
    return KINDS[norm]


def make(norm: str, eps, domain=None, directions=None) -> ThreatSet:
    """The set of kind ``norm`` with radius ``eps``; ``directions()`` is called only for kinds that need them."""
    cls = kind(norm)
    if cls.needs_directions:
        if directions is None:
            raise InputError(f"threat sets of kind {norm!r} need directions")
        return cls(directions(), eps, domain=domain)
    return cls(eps, domain=domain)


def ball(norm: str, eps, domain=None) -> ThreatSet:
    """The ball of a run's norm: the set itself for a ball, the ℓ2 ball for kinds that need directions."""
    cls = kind(norm)
    return (L2Ball if cls.needs_directions else cls)(eps, domain=domain)
