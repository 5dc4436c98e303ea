"""Certificates that hang on float32 rounding are decided in float64 (certlab.bounds.rounding).

On a linear model every relaxation is exact, so the exact minimum margin over an ℓ∞ box is known in rational
arithmetic: Σ dᵢxᵢ + δb − ε Σ|dᵢ| with d = W_y − W_j. Radii a hair (1e-9 relative) past or short of the exact root
make the float32 decision a coin toss; the checked decision must follow the exact sign every time.
"""

from fractions import Fraction

import pytest
import torch
from torch import nn

import certlab
from certlab.bounds import engine, rounding
from certlab.verify.radius import certified_radius

METHODS = ("ibp", "hbox", "deepz", "fastlin", "crown", "crown-ibp", "alpha-crown")


def linear_case(B=256, n=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(n, 2)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, n, generator=g))
        model.bias.copy_(torch.randn(2, generator=g))
    x = 0.2 + 0.6 * torch.rand(B, n, generator=g)
    y = model(x).argmax(1)
    return model, x, y


def exact_parts(model, x, y):
    """Per sample (S, N1): the exact clean margin and the ℓ1 norm of W_y − W_j, as Fractions."""
    W = [[Fraction(v) for v in row] for row in model.weight.detach().double().tolist()]
    b = [Fraction(v) for v in model.bias.detach().double().tolist()]
    out = []
    for xi, yi in zip(x.double().tolist(), y.tolist()):
        d = [W[yi][i] - W[1 - yi][i] for i in range(len(xi))]
        S = sum(di * Fraction(v) for di, v in zip(d, xi)) + b[yi] - b[1 - yi]
        out.append((S, sum(abs(di) for di in d)))
    return out


def radii(parts, rel):
    """float64 radii root·(1 + rel), and the exact minimum margin over each box."""
    eps = [float(S / N1 * (1 + Fraction(rel))) for S, N1 in parts]
    exact = [S - Fraction(e) * N1 for (S, N1), e in zip(parts, eps)]
    return torch.tensor(eps, dtype=torch.float64), exact


@pytest.mark.parametrize("method", METHODS)
def test_borderline_certificates_follow_the_exact_sign(method):
    model, x, y = linear_case()
    parts = exact_parts(model, x, y)
    # just past the exact root: no sample is robust
    eps, exact = radii(parts, 1e-9)
    assert all(e < 0 for e in exact)
    threat = certlab.LinfBall(eps, domain=None)
    raw = certlab.certify(model, x, y, threat, method=method, recheck=False)
    assert raw.sum() >= 5, "float32 rounding should certify some of these (the test would not bite otherwise)"
    assert not certlab.certify(model, x, y, threat, method=method).any()
    # just short of it: every sample is robust; the float32 certificates (all within rounding of zero) are
    # confirmed in float64, not refused (float32's false negatives stay: only positive margins are rechecked)
    eps, exact = radii(parts, -1e-9)
    assert all(e > 0 for e in exact)
    threat = certlab.LinfBall(eps, domain=None)
    raw = certlab.certify(model, x, y, threat, method=method, recheck=False)
    assert raw.sum() >= 5 and (~raw).sum() >= 5
    assert torch.equal(certlab.certify(model, x, y, threat, method=method), raw)


def test_float64_radius_is_kept():
    e = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert certlab.LinfBall(e).eps.dtype == torch.float64
    assert certlab.LinfBall(e.float()).eps.dtype == torch.float32
    assert certlab.LinfBall(torch.tensor([1, 2])).eps.dtype == torch.float32
    d = torch.randn(2, 3, dtype=torch.float64)
    assert certlab.SegmentUnion(d, 0.1).directions_for(torch.zeros(1, 3, dtype=torch.float64)).dtype == torch.float64


def test_subset_follows_per_sample_radii_and_directions():
    x = torch.rand(4, 3)
    d = torch.randn(4, 2, 3)
    t = certlab.SegmentUnion(d, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    idx = torch.tensor([3, 1])
    s = t.subset(x, idx)
    assert s.eps.tolist() == [0.4, 0.2] and s.eps.dtype == torch.float64
    torch.testing.assert_close(s.directions_for(x[idx]), t.directions_for(x)[idx])
    with pytest.raises(certlab.InputError, match="radii"):
        t.subset(x[:3], idx)


def test_radius_search_never_returns_a_radius_past_the_exact_root():
    model, x, y = linear_case(B=128, seed=1)
    parts = exact_parts(model, x, y)
    top = float(max(S / N1 for S, N1 in parts)) * 2
    kw = dict(threat=certlab.LinfBall(0.0, domain=None), method="ibp", max_eps=top, tol=1e-12)
    past = lambda r: sum(S - Fraction(v) * N1 <= 0 for (S, N1), v in zip(parts, r.double().tolist()))  # noqa: E731
    assert past(certified_radius(model, x, y, recheck=False, **kw)) >= 1  # float32 alone overshoots some roots
    assert past(certified_radius(model, x, y, **kw)) == 0


def test_without_a_float64_copy_borderline_samples_are_not_certified(monkeypatch):
    model, x, y = linear_case(B=64)
    eps, _ = radii(exact_parts(model, x, y), -1e-9)  # all robust, all within rounding of zero
    threat = certlab.LinfBall(eps, domain=None)
    assert certlab.certify(model, x, y, threat, method="crown").any()
    monkeypatch.setattr(rounding.Float64Twin, "get", lambda self: None)
    assert not certlab.certify(model, x, y, threat, method="crown").any()
    monkeypatch.undo()

    def no_copy(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(rounding.copy, "deepcopy", no_copy)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        assert not certlab.certify(model, x, y, threat, method="crown").any()


def test_margins_far_from_zero_need_no_float64_copy(monkeypatch):
    model, x, y = linear_case(B=64)
    eps, _ = radii(exact_parts(model, x, y), -0.5)

    def refuse(self):
        raise AssertionError("a float64 copy was made for margins far from zero")

    monkeypatch.setattr(rounding.Float64Twin, "get", refuse)
    assert certlab.certify(model, x, y, certlab.LinfBall(eps, domain=None), method="crown").all()


def test_batch_statistics_are_rechecked_on_the_whole_batch(monkeypatch):
    """BatchNorm in train mode maps each sample with the batch's statistics: a recheck of a subset alone would
    bound another function. With every certificate forced through the recheck, the settled margins are the float64
    margins of the whole batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).train()
    x = torch.rand(32, 5)
    y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 3  # wrong labels: not certified, not rechecked
    threat = certlab.LinfBall(0.001)
    m = certlab.margins(model, x, y, threat, method="crown")
    cand = ((m > 0) | nn.functional.one_hot(y, 3).bool()).all(1)
    assert 0 < cand.sum() < 32
    monkeypatch.setattr(rounding, "REL", 1e9)
    out = rounding.settle(model, x, y, threat, "crown", m)
    whole = certlab.margins(rounding.Float64Twin(model).get(), x.double(), y, threat, method="crown")
    alone = certlab.margins(rounding.Float64Twin(model).get(), x[cand].double(), y[cand], threat, method="crown")
    torch.testing.assert_close(out[cand], whole[cand].float())
    assert (alone.float() - out[cand]).abs().max() > 1e-3  # the subset's own statistics give other margins
    torch.testing.assert_close(out[~cand], m[~cand])


def test_complete_verifiers_do_not_verify_on_rounding(monkeypatch):
    """Logits in the millions put float32's rounding and HiGHS's error far above the old absolute tolerance (1e-6).
    A ReLU network whose ReLUs are all active on the set is affine there, so its exact minimum margin is known:
    radii 1e-9 past the exact root must never come back verified by BaB, the MILP or the LP (all three did, with
    the absolute tolerance alone)."""
    from certlab.verify import bab, lp, milp

    g = torch.Generator().manual_seed(3)
    n, h, B = 30, 20, 24
    model = nn.Sequential(nn.Linear(n, h), nn.ReLU(), nn.Linear(h, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(h, n, generator=g))
        model[0].bias.fill_(1000.0)  # every ReLU active on the sets (checked below)
        model[2].weight.copy_(300 * torch.randn(2, h, generator=g))
        model[2].bias.zero_()
    x = 0.2 + 0.6 * torch.rand(B, n, generator=g)
    y = model(x).argmax(1)
    W1 = [[Fraction(v) for v in r] for r in model[0].weight.double().tolist()]
    W2 = [[Fraction(v) for v in r] for r in model[2].weight.double().tolist()]
    b1 = [Fraction(v) for v in model[0].bias.double().tolist()]
    eps = []
    for xi, yi in zip(x.double().tolist(), y.tolist()):
        d2 = [W2[yi][k] - W2[1 - yi][k] for k in range(h)]
        v = [sum(d2[k] * W1[k][i] for k in range(h)) for i in range(n)]
        S = sum(vi * Fraction(xv) for vi, xv in zip(v, xi)) + sum(d2[k] * b1[k] for k in range(h))
        N1 = sum(abs(vi) for vi in v)
        e = float(S / N1 * (1 + Fraction(1e-9)))
        assert S - Fraction(e) * N1 < 0
        eps.append(e)
    e = torch.tensor(eps, dtype=torch.float64)
    W, xd = model[0].weight.double(), x.double()
    assert (xd @ W.T - e[:, None] * W.abs().sum(1) + 1000 > 1).all()
    threat = certlab.LinfBall(e, domain=None)
    verdicts = lambda: [r.status for r in bab.verify(model, x, y, threat, timeout=5, attack=False)]  # noqa: E731
    assert "verified" not in verdicts()
    assert "verified" not in [r.status for r in milp.verify(model, x, y, threat, timeout=5, attack=False)]
    assert "verified" not in [r.status for r in lp.verify(model, x, y, threat, timeout=5)]
    absolute = lambda *a: (bab.TOL, bab.TOL)  # noqa: E731  (the absolute tolerance alone)
    for mod in (bab, milp, lp):
        monkeypatch.setattr(mod, "decision_tols", absolute)
    monkeypatch.setattr(rounding, "REL", 0.0)  # and no recheck of the screening certify
    assert verdicts().count("verified") >= 3
    assert [r.status for r in milp.verify(model, x, y, threat, timeout=5, attack=False)].count("verified") >= 3
    assert [r.status for r in lp.verify(model, x, y, threat, timeout=5)].count("verified") >= 3


@pytest.mark.parametrize("kind", ["linf", "l2", "segments"])
def test_recheck_takes_each_samples_own_set(monkeypatch, kind):
    """With every certificate forced through the float64 recheck, the subsets it recomputes carry each sample's own
    radius (and own segment directions): the decisions equal float64's over the whole batch."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x = torch.rand(40, 1, 6, 6)
    y = model(x).argmax(1)
    eps = torch.linspace(0.0, 0.3, 40)
    if kind == "linf":
        th = certlab.LinfBall(eps)
    elif kind == "l2":
        th = certlab.L2Ball(eps * 4)
    else:
        th = certlab.SegmentUnion(torch.randn(40, 2, 1, 6, 6), eps * 4, domain=(0.0, 1.0))
    want = certlab.certify(rounding.Float64Twin(model).get(), x.double(), y, th, method="crown")
    assert 0 < want.sum() < 40
    monkeypatch.setattr(rounding, "REL", 1e9)
    calls = []
    orig = rounding.Float64Twin.get
    monkeypatch.setattr(rounding.Float64Twin, "get", lambda self: calls.append(1) or orig(self))
    assert torch.equal(certlab.certify(model, x, y, th, method="crown"), want)
    assert calls


def test_bounds_run_in_full_float32_whatever_precision_the_caller_set(monkeypatch):
    """TF32 (cuDNN convolutions use it by default on NVIDIA GPUs) and bf16 keep 10 and 7 mantissa bits: a bound
    computed with them could miss the rounding line above by a thousandfold. Every entry point of the bound engine
    and of complete verification runs with full float32, and gives the caller's settings back."""
    from certlab.bounds import core

    switches = core._precision_switches()
    before = [getattr(o, attr) for o, attr, _ in switches]
    try:
        reduced = {}
        for obj, attr, _ in switches:  # the caller asks for reduced precision everywhere it can
            for value in (("tf32", "bf16") if attr == "fp32_precision" else (True,)):
                try:
                    setattr(obj, attr, value)
                    break
                except (RuntimeError, ValueError, AssertionError):  # a switch that does not take this value
                    continue
            reduced[id(obj)] = getattr(obj, attr)
        _check_entry_points(monkeypatch, switches, reduced)
    finally:  # not monkeypatch: its undo deletes attributes that live on the class
        for (obj, attr, _), old in zip(switches, before):
            setattr(obj, attr, old)


def _check_entry_points(monkeypatch, switches, reduced):
    from certlab.bounds import core
    from certlab.bounds.ops import LinearOp
    from certlab.evaluation import _radius
    from certlab.verify.complete import verify_complete

    from nets import mlp

    assert any(v not in ("ieee", False) for v in reduced.values())
    seen = []

    def spy(name):
        orig = getattr(LinearOp, name)

        def wrapped(self, *a, **k):
            seen.append(tuple(getattr(o, attr) for o, attr, _ in switches))
            return orig(self, *a, **k)

        monkeypatch.setattr(LinearOp, name, wrapped)

    for name in ("fwd", "absfwd", "back"):
        spy(name)
    model = mlp(3, widths=(4, 8, 8, 3))
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1)
    th = certlab.LinfBall(0.05)
    wide = certlab.LinfBall(0.3)  # wide enough that branch and bound branches
    calls = {
        "bounds": lambda: [certlab.bounds(model, x, th, method=m) for m in ("ibp", "crown", "alpha-crown")],
        "margins": lambda: certlab.margins(model, x, y, th, method="crown-ibp"),
        "certify": lambda: certlab.certify(model, x, y, th, method="fastlin"),
        "relu_bounds": lambda: engine.relu_bounds(model, x, th, "crown"),
        "report radii": lambda: _radius(model, x, y, th, "crown-ibp", 0.1),
        "settle": lambda: rounding.settle(model, x, y, th, "crown", torch.full((3, 3), 1e-7)),  # all rechecked
        **{v: (lambda v=v: verify_complete(model, x[:1], y[:1], wide, method=v, timeout=20))
           for v in ("bab", "milp", "lp")},
    }
    exact = tuple(e for _, _, e in switches)
    for name, call in calls.items():
        seen.clear()
        call()
        assert seen, f"{name}: the spy saw no affine op"
        assert all(s == exact for s in seen), f"{name} ran with reduced precision: {set(seen) - {exact}}"
        now = {id(o): getattr(o, attr) for o, attr, _ in switches}
        assert now == reduced, f"{name} did not give the caller's precision settings back"
    # training losses certify nothing: there the caller's settings stay
    caller = tuple(reduced[id(o)] for o, _, _ in switches)
    seen.clear()
    with core.caller_precision():
        certlab.margins(model, x, y, th, method="crown-ibp")
    assert seen and all(s == caller for s in seen)
