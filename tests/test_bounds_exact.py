"""Every relaxation against the exact MILP optimum on tiny networks (ℓ∞ balls).

- soundness: lower ≤ exact min and upper ≥ exact max of each logit (and of margin specifications);
- α-CROWN is never looser than CROWN;
- exactness: with no crossing ReLU (checked) the back-substitution / symbolic methods equal the MILP, and so do all
  methods on a single affine layer; on a purely linear deep network everything but IBP is exact.
"""

import pytest
import torch
from torch import nn

import certlab
from certlab.bounds.engine import relu_bounds
from certlab.verify.milp import exact_bounds

TOL = 1e-5
EXACT_WHEN_STABLE = ("hbox", "deepz", "fastlin", "crown", "crown-ibp", "alpha-crown")


def _init(model, seed, bias=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def mlp(seed):
    return _init(nn.Sequential(nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)), seed)


def tiny_cnn(seed):
    return _init(nn.Sequential(
        certlab.nn.Normalize([0.5], [0.3]), nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool2d(2, 1), nn.Flatten(),
        nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), seed)


def residual(seed):
    body = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    return _init(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), certlab.nn.Residual(body), nn.ReLU(),
                               nn.Linear(6, 3)), seed)


CASES = [
    ("mlp", mlp, (2,), 0.15),
    ("cnn", tiny_cnn, (1, 4, 4), 0.02),
    ("residual", residual, (3,), 0.15),
]


def _data(shape, seed, B=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((B, *shape), generator=g) * 0.8 + 0.1


def _n_crossing(model, x, threat, method="crown"):
    return sum(int(((l < 0) & (u > 0)).sum()) for l, u in relu_bounds(model, x, threat, method))


@pytest.mark.parametrize("name,build,shape,eps", CASES, ids=[c[0] for c in CASES])
def test_all_methods_sound_against_milp(name, build, shape, eps):
    torch.manual_seed(0)
    model, x = build(1), _data(shape, 2)
    threat = certlab.LinfBall(eps)
    assert _n_crossing(model, x, threat) > 0, "the test needs crossing neurons to mean anything"
    lo, hi = exact_bounds(model, x, threat)
    # the MILP optimum is attained: sampled points never beat it
    with torch.no_grad():
        pts = threat.sample(x, 2000).reshape(-1, *shape)
        out = model(pts).reshape(2000, x.shape[0], -1)
    assert (out.min(0).values >= lo - TOL).all() and (out.max(0).values <= hi + TOL).all()
    loosest = {}
    for m in certlab.METHODS:
        b = certlab.bounds(model, x, threat, m)
        assert (b.lower <= lo + TOL).all(), f"{m} lower bound above the exact minimum on {name}"
        assert (b.upper >= hi - TOL).all(), f"{m} upper bound below the exact maximum on {name}"
        loosest[m] = float((lo - b.lower).max().detach())
    assert loosest["ibp"] > 1e-3  # the relaxations are not trivially exact here
    c = certlab.bounds(model, x, threat, "crown").lower
    a = certlab.bounds(model, x, threat, "alpha-crown", iters=10).lower
    assert (a >= c - 1e-6).all()


@pytest.mark.parametrize("name,build,shape,eps", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_margins_sound_against_milp(name, build, shape, eps):
    torch.manual_seed(0)
    model, x = build(3), _data(shape, 4)
    threat = certlab.LinfBall(torch.tensor([eps, eps / 2, 2 * eps]))  # per-sample radii
    y = model(x).argmax(1)
    C = torch.eye(3)[y].unsqueeze(1) - torch.eye(3).unsqueeze(0)
    lo, hi = exact_bounds(model, x, threat, C=C)
    for m in certlab.METHODS:
        mg = certlab.margins(model, x, y, threat, m)
        assert (mg <= lo + TOL).all(), f"{m} margin bound above the exact minimum"
        cert = certlab.certify(model, x, y, threat, m)
        exact_robust = (lo + torch.eye(3)[y] * 1e9).min(1).values > 0
        assert not (cert & ~exact_robust).any(), f"{m} certifies a sample that the MILP shows is not robust"


@pytest.mark.parametrize("kind", ["l2", "segments", "box"])
def test_other_sets_sound_against_milp(kind):
    """ℓ2 (exact up to 1e-6 by tangent cuts), unions of segments (exact, one binary per segment) and per-feature
    boxes."""
    torch.manual_seed(0)
    model, x = mlp(11), _data((2,), 12, B=2)
    if kind == "l2":
        threat = certlab.L2Ball(0.25)
    elif kind == "box":
        threat = certlab.Box(x - torch.tensor([[0.3, 0.05], [0.0, 0.2]]), x + torch.tensor([[0.1, 0.25], [0.3, 0.2]]))
    else:
        threat = certlab.SegmentUnion(torch.randn(3, 2, generator=torch.Generator().manual_seed(1)), 0.3,
                                      domain=(0.0, 1.0))
    lo, hi = exact_bounds(model, x, threat)
    with torch.no_grad():
        out = model(threat.sample(x, 4000).reshape(-1, 2)).reshape(4000, 2, -1)
    assert (out.min(0).values >= lo - TOL).all() and (out.max(0).values <= hi + TOL).all()
    assert (out.min(0).values - lo).max() < 0.05  # and it is attained (sampling gets close in 2-D)
    for m in certlab.METHODS:
        b = certlab.bounds(model, x, threat, m)
        assert (b.lower <= lo + TOL).all() and (b.upper >= hi - TOL).all(), f"{m} unsound on {kind}"


def _stable_mlp(seed):
    """Biases large against small weights: every ReLU has a fixed sign over the ball."""
    model = _init(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.mul_(0.5)
            lin.bias.copy_(torch.where(torch.rand(lin.bias.shape, generator=g) < 0.6, 3.0, -3.0))
    return model


@pytest.mark.parametrize("method", certlab.METHODS)
def test_exact_without_crossing_neurons(method):
    torch.manual_seed(0)
    model, x = _stable_mlp(5), _data((2,), 6)
    threat = certlab.LinfBall(0.1)
    assert _n_crossing(model, x, threat, "ibp") == 0
    assert any(bool((u <= 0).any()) for _, u in relu_bounds(model, x, threat, "ibp"))  # some are dead
    lo, hi = exact_bounds(model, x, threat)
    b = certlab.bounds(model, x, threat, method)
    if method in EXACT_WHEN_STABLE:
        assert torch.allclose(b.lower, lo, atol=TOL) and torch.allclose(b.upper, hi, atol=TOL)
    else:  # IBP loses the correlations between neurons: sound, and strictly loose here
        assert (b.lower <= lo + TOL).all() and (b.upper >= hi - TOL).all()
        assert float((lo - b.lower).max().detach()) > 1e-3


@pytest.mark.parametrize("method", certlab.METHODS)
def test_exact_on_linear_networks(method):
    torch.manual_seed(0)
    x = _data((4,), 7)
    threat = certlab.LinfBall(0.2)
    one = _init(nn.Sequential(certlab.nn.Normalize([0.4] * 4, [0.6] * 4), nn.Linear(4, 3)), 8)
    lo, hi = exact_bounds(one, x, threat)
    b = certlab.bounds(one, x, threat, method)
    assert torch.allclose(b.lower, lo, atol=TOL) and torch.allclose(b.upper, hi, atol=TOL)
    deep = _init(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)), 9)
    lo, hi = exact_bounds(deep, x, threat)
    b = certlab.bounds(deep, x, threat, method)
    if method == "ibp":
        assert (b.lower <= lo + TOL).all() and (b.upper >= hi - TOL).all()
    else:
        assert torch.allclose(b.lower, lo, atol=TOL) and torch.allclose(b.upper, hi, atol=TOL)
