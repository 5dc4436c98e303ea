"""Threat sets: concretisation is the exact support function, projection lands in the set, samples lie in it."""

import pytest
import torch

import certlab
from certlab.errors import InputError


def _sets(x):
    g = torch.Generator().manual_seed(1)
    d = torch.randn(4, *x.shape[1:], generator=g)
    per = torch.randn(x.shape[0], 2, *x.shape[1:], generator=g)
    return [
        certlab.LinfBall(0.1),
        certlab.LinfBall(torch.linspace(0, 0.3, x.shape[0])),
        certlab.L2Ball(0.4),
        certlab.L2Ball(0.4, domain=None),
        certlab.SegmentUnion(d, 0.5),
        certlab.SegmentUnion(d, 0.5, domain=(0, 1)),
        certlab.SegmentUnion(per, torch.linspace(0.1, 0.6, x.shape[0]), domain=(0, 1)),
        certlab.Box(x - 0.3 * torch.rand(x.shape, generator=g), x + 0.2 * torch.rand(x.shape, generator=g)),
        certlab.Box(x - 0.3, x + 0.1, domain=(0, 1)),
    ]


@pytest.mark.parametrize("i", range(9))
def test_concretize_contains_samples_and_is_tight(i):
    torch.manual_seed(0)
    x = torch.rand(5, 6)
    th = _sets(x)[i]
    A = torch.randn(5, 3, 6)
    lo, hi = th.concretize(A, x)
    pts = th.sample(x, 4000)
    assert all(th.contains(p, x).all() for p in pts[:300])
    vals = torch.einsum("bsn,mbn->mbs", A, pts)
    assert (vals >= lo - 1e-5).all() and (vals <= hi + 1e-5).all()
    # tight: the support is attained by a point of the set (the sampled extreme is close for these low dimensions)
    if th.norm == "segments":
        assert ((vals.max(0).values - hi).abs() < 0.05 * (hi - lo + 1e-6)).all()
    # the hull contains every sample
    hlo, hhi = th.interval_hull(x)
    assert (pts >= hlo - 1e-6).all() and (pts <= hhi + 1e-6).all()


def test_linf_concretize_is_exact_at_vertices():
    x = torch.rand(4, 5)
    th = certlab.LinfBall(0.2)
    A = torch.randn(4, 2, 5)
    lo, _ = th.concretize(A, x)
    blo, bhi = th.interval_hull(x)
    best = torch.where(A > 0, blo.unsqueeze(1), bhi.unsqueeze(1))
    assert torch.allclose((A * best).sum(-1), lo, atol=1e-5)


def test_segment_support_function():
    x = torch.zeros(1, 3)
    d = torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])
    th = certlab.SegmentUnion(d, 2.0)
    A = torch.tensor([[[3.0, -1.0, 5.0]]])
    lo, hi = th.concretize(A, x)
    assert lo.item() == pytest.approx(-6.0) and hi.item() == pytest.approx(6.0)  # max_j |a·d_j| ε = 3·2


@pytest.mark.parametrize("i", range(9))
def test_project_lands_in_set_and_is_nearest(i):
    torch.manual_seed(2)
    x = torch.rand(5, 6)
    th = _sets(x)[i]
    z = x + torch.randn(5, 6)
    p = th.project(z, x)
    assert th.contains(p, x).all()
    pts = th.sample(x, 3000)
    d_best = (pts - z).norm(dim=-1).min(0).values
    assert ((p - z).norm(dim=-1) <= d_best + 1e-4).all()
    assert torch.allclose(th.project(x, x), x)


def test_l2_projection_exact_on_box_corner():
    x = torch.tensor([[0.95, 0.5]])
    th = certlab.L2Ball(0.3)
    p = th.project(torch.tensor([[2.0, 0.5 + 1e-3]]), x)
    assert p[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert ((p - x).norm() <= 0.3 + 1e-6)


def test_bad_sets():
    with pytest.raises(InputError, match=">= 0"):
        certlab.L2Ball(-1)
    with pytest.raises(InputError, match="NaN"):
        certlab.SegmentUnion(torch.tensor([[float("nan"), 1.0]]), 1.0)
    with pytest.raises(InputError, match="zero norm"):
        certlab.SegmentUnion(torch.zeros(1, 3), 1.0).directions_for(torch.zeros(2, 3))
    with pytest.raises(InputError, match="domain"):
        certlab.LinfBall(0.1, domain=(1, 0))
    with pytest.raises(InputError, match="do not fit"):
        certlab.SegmentUnion(torch.ones(2, 3), 1.0).directions_for(torch.zeros(2, 4, 4, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("domain", [(0.0, 1.0), None])
def test_validate_names_a_single_nonfinite_entry_anywhere(bad, domain):
    """validate reads x once (aminmax): one NaN or ±inf at the first, a middle or the last entry is still caught,
    with or without a domain."""
    for ball in (certlab.LinfBall(0.1, domain=domain), certlab.L2Ball(0.1, domain=domain)):
        for pos in (0, 37, -1):
            x = torch.rand(3, 1, 5, 5)
            x.view(-1)[pos] = bad
            with pytest.raises(certlab.InputError, match="NaN or inf"):
                ball.validate(x)


@pytest.mark.parametrize("make", [
    lambda: certlab.LinfBall(0.1), lambda: certlab.LinfBall(torch.tensor([0.0, 0.05, 0.3])),
    lambda: certlab.LinfBall(0.2, domain=None),
    lambda: certlab.L2Ball(0.5), lambda: certlab.L2Ball(torch.tensor([0.1, 0.0, 1.0]), domain=(-1.0, 2.0)),
])
@pytest.mark.parametrize("grad", [False, True])
def test_centre_radius_is_the_interval_hull(make, grad):
    """(c, r) from centre_radius (in place on fresh tensors when no gradient is recorded) spans the interval hull,
    does not touch x, and lets gradients through when x requires them."""
    threat = make()
    x = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(3))
    x0 = x.clone()
    x.requires_grad_(grad)
    lo, hi = threat.interval_hull(x)
    c, r = threat.centre_radius(x)
    torch.testing.assert_close(c - r, lo, rtol=0, atol=1e-6)
    torch.testing.assert_close(c + r, hi, rtol=0, atol=1e-6)
    assert torch.equal(x.detach(), x0)
    if grad:
        (g,) = torch.autograd.grad((c + r).sum(), x)
        hi_free = (x0 + threat.eps_view(x0)) < threat.domain[1] if threat.domain else torch.ones_like(x0, dtype=torch.bool)
        torch.testing.assert_close(g, hi_free.float())


def _zero_row_nets():
    """A first-layer neuron with an all-zero weight row, and a convolution whose corner outputs read only padding."""
    from torch import nn

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        dense[0].weight[2].zero_()
    conv = nn.Sequential(nn.Conv2d(1, 2, 1, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    return [(dense, torch.rand(2, 4)), (conv, torch.rand(2, 1, 4, 4))]


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_l2_bound_gradients_are_finite(eps):
    """The derivative of √· at 0 (a zero row norm) must not turn the gradient of an ℓ2 bound into NaN."""
    for model, x in _zero_row_nets():
        x = x.clone().requires_grad_(True)
        e = torch.tensor(eps, requires_grad=True)
        for m in ("ibp", "fastlin", "crown", "crown-ibp", "alpha-crown"):
            b = certlab.bounds(model, x, certlab.L2Ball(e.expand(x.shape[0]), domain=None), method=m)
            model.zero_grad()
            (b.lower.sum() - b.upper.sum()).backward()
            grads = [p.grad for p in model.parameters()] + [x.grad, e.grad]
            assert all(torch.isfinite(g).all() for g in grads if g is not None), f"{m}: NaN gradient at eps={eps}"
            x.grad = e.grad = None
