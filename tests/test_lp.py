"""The triangle LP: between the single-neuron relaxations and the exact MILP."""

import torch

import certlab
from nets import mlp
from certlab.verify import lp, milp


def _net(seed, widths=(3, 12, 12, 3)):
    return mlp(seed, widths)


def test_lp_between_relaxations_and_milp():
    torch.manual_seed(0)
    model = _net(0)
    x = torch.rand(3, 3, generator=torch.Generator().manual_seed(1))
    threat = certlab.LinfBall(0.15)
    lo, hi = milp.exact_bounds(model, x, threat)
    l, u = lp.lp_bounds(model, x, threat)
    assert (l <= lo + 1e-5).all() and (u >= hi - 1e-5).all()  # a relaxation of the exact problem
    crown = certlab.bounds(model, x, threat, "crown")
    alpha = certlab.bounds(model, x, threat, "alpha-crown", iters=30)
    # same intermediate bounds: CROWN's lines and any α are feasible duals of this LP
    assert (l >= crown.lower - 1e-5).all() and (u <= crown.upper + 1e-5).all()
    assert (l >= alpha.lower - 1e-5).all() and (u <= alpha.upper + 1e-5).all()
    assert float((l - crown.lower.detach()).max()) > 1e-3 and float((lo - l).max()) > 1e-4  # strict gaps on this net
    lr, ur = lp.lp_bounds(model, x, threat, refine=True)
    assert (lr >= l - 1e-6).all() and (ur <= u + 1e-6).all() and (lr <= lo + 1e-5).all()


def test_lp_verify_only_verified_or_unknown_and_agrees_with_milp():
    model = _net(2, (2, 16, 16, 3))
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    threat = certlab.LinfBall(0.08)
    res = lp.verify(model, x, y, threat, timeout=10)
    exact = milp.verify(model, x, y, threat, timeout=10)
    crown = certlab.certify(model, x, y, threat, "crown")
    for b, r in enumerate(res):
        assert r.status in ("verified", "unknown") and r.counterexample is None
        if r.status == "verified":
            assert exact[b].status == "verified"
        if crown[b]:
            assert r.status == "verified"
    m = lp.lp_margins(model, x, y, threat)
    assert m.shape == (8, 3) and (m >= certlab.margins(model, x, y, threat, "crown") - 1e-5).all()


def test_lp_segments_uses_the_convex_hull():
    model = _net(4, (2, 10, 10, 2))
    x = torch.rand(2, 2, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.25
    seg = certlab.SegmentUnion(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 0.2)
    l, u = lp.lp_bounds(model, x, seg)
    lo, hi = milp.exact_bounds(model, x, seg)
    crown = certlab.bounds(model, x, seg, "crown")
    assert (l <= lo + 1e-5).all() and (u >= hi - 1e-5).all()
    assert (l >= crown.lower - 1e-5).all()
