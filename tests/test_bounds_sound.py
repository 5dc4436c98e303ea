"""Soundness: for every relaxation and threat set, sampled, vertex and PGD-extreme points lie within the bounds."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import certlab
from nets import cnn, mlp, pgd_extremes, threat_for

TOL = 1e-5
THREATS = ("linf", "l2", "segments", "box")


def _points(model, x, threat, seed):
    g = torch.Generator().manual_seed(seed)
    pts = [threat.sample(x, 200, generator=g), pgd_extremes(model, x, threat, steps=15, restarts=1, seed=seed)]
    if threat.is_box:
        pts.append(threat.vertices(x, 100, generator=g))
    pts.append(x.unsqueeze(0))
    return torch.cat(pts)


def _check(model, x, threat, method, seed):
    b = certlab.bounds(model, x, threat, method=method)
    pts = _points(model, x, threat, seed)
    assert all(bool(threat.contains(p, x).all()) for p in pts)
    with torch.no_grad():
        out = model(pts.reshape(-1, *x.shape[1:])).reshape(pts.shape[0], x.shape[0], -1)
    assert b.lower.shape == out.shape[1:] and b.upper.shape == out.shape[1:]
    assert (out >= b.lower - TOL).all(), f"{method}: a point falls below the lower bound by {(b.lower - out).max():.3g}"
    assert (out <= b.upper + TOL).all(), f"{method}: a point lies above the upper bound by {(out - b.upper).max():.3g}"
    return b


arch = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "bn": st.booleans(),
    "residual": st.booleans(),
    "normalize": st.booleans(),
    "eps": st.sampled_from([0.01, 0.05, 0.2]),
})
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("threat_kind", THREATS)
@pytest.mark.parametrize("method", certlab.METHODS)
@SETTINGS
@given(a=arch)
def test_mlp_bounds_contain_points(method, threat_kind, a):
    torch.manual_seed(a["seed"])
    model = mlp(a["seed"], widths=(5, 8, 8, 8, 3), bn=a["bn"], residual=a["residual"], normalize=a["normalize"])
    x = torch.rand(3, 5)
    th = threat_for(threat_kind, x, a["eps"] * (4 if threat_kind not in ("linf", "box") else 1), seed=a["seed"])
    _check(model, x, th, method, a["seed"])


@pytest.mark.parametrize("threat_kind", THREATS)
@pytest.mark.parametrize("method", certlab.METHODS)
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(a=arch, pool=st.booleans())
def test_cnn_bounds_contain_points(method, threat_kind, a, pool):
    torch.manual_seed(a["seed"])
    model = cnn(a["seed"], bn=a["bn"], residual=a["residual"], normalize=a["normalize"], pool=pool)
    x = torch.rand(2, 1, 6, 6)
    th = threat_for(threat_kind, x, a["eps"] * (3 if threat_kind not in ("linf", "box") else 1), seed=a["seed"])
    _check(model, x, th, method, a["seed"])


@pytest.mark.parametrize("method", certlab.METHODS)
def test_per_sample_eps_and_train_mode_batchnorm(method):
    model = mlp(3, widths=(4, 10, 10, 3), bn=True)
    model.train()
    x = torch.rand(6, 4)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 0.3])
    th = certlab.LinfBall(eps)
    b = certlab.bounds(model, x, th, method=method)
    # the forward pass in train mode normalises with the statistics of the clean batch x: bound that function
    with torch.no_grad():
        mu = {}
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                def hook(mod, inp, out, name=name):
                    mu[name] = (inp[0].mean(0), inp[0].var(0, unbiased=False))

                hooks.append(m.register_forward_hook(hook))
        model(x)
        for h in hooks:
            h.remove()
        model.eval()
        for name, m in model.named_modules():
            if name in mu:
                m.running_mean.copy_(mu[name][0])
                m.running_var.copy_(mu[name][1])
        pts = th.sample(x, 500)
        out = model(pts.reshape(-1, 4)).reshape(500, 6, 3)
    assert (out >= b.lower - TOL).all() and (out <= b.upper + TOL).all()
    # eps = 0 gives the point itself for every method
    assert torch.allclose(b.lower[0], out[0, 0], atol=1e-5) and torch.allclose(b.upper[0], out[0, 0], atol=1e-5)
    # larger eps, wider bounds (same network, same statistics)
    w = (b.upper - b.lower).sum(1)
    assert w[5] > w[1]


@pytest.mark.parametrize("method", certlab.METHODS)
def test_spec_matrix_bounds_and_margins(method):
    model = mlp(11, widths=(4, 12, 12, 5))
    x = torch.rand(4, 4)
    th = certlab.LinfBall(0.05)
    g = torch.Generator().manual_seed(0)
    C = torch.randn(4, 3, 5, generator=g)
    b = certlab.bounds(model, x, th, method=method, C=C)
    assert b.lower.shape == (4, 3)
    pts = torch.cat([th.sample(x, 500), th.vertices(x, 200)])
    with torch.no_grad():
        out = torch.einsum("bsk,nbk->nbs", C, model(pts.reshape(-1, 4)).reshape(-1, 4, 5))
    assert (out >= b.lower - TOL).all() and (out <= b.upper + TOL).all()
    # C folded into the last layer is never looser than bounding the logits and applying C afterwards
    plain = certlab.bounds(model, x, th, method=method)
    Cp, Cn = C.clamp(min=0), C.clamp(max=0)
    naive_low = torch.einsum("bsk,bk->bs", Cp, plain.lower) + torch.einsum("bsk,bk->bs", Cn, plain.upper)
    assert (b.lower >= naive_low - 1e-5).all()
    # shared [S, K] spec broadcasts
    b2 = certlab.bounds(model, x, th, method=method, C=C[0])
    assert b2.lower.shape == (4, 3)
    y = model(x).argmax(1)
    m = certlab.margins(model, x, y, th, method=method)
    assert m.shape == (4, 5) and (m.gather(1, y[:, None]) == 0).all()
    with torch.no_grad():
        o = model(pts.reshape(-1, 4)).reshape(-1, 4, 5)
        true_margin = o.gather(2, y.view(1, 4, 1).expand(o.shape[0], 4, 1)) - o
    assert (true_margin.min(0).values >= m - TOL).all()


@pytest.mark.parametrize("threat_kind", THREATS)
@pytest.mark.parametrize("method", certlab.METHODS)
def test_float64_bounds(method, threat_kind):
    """Every relaxation runs in float64 (docs/architecture.md, "Floating point"): float64 bounds of a float64 copy
    contain the float64 outputs at tight tolerance and agree with the float32 bounds to float32 rounding."""
    import copy

    model = cnn(5, bn=True, residual=True, normalize=True).eval()
    x = torch.rand(2, 1, 6, 6)
    th = threat_for(threat_kind, x, 0.05 if threat_kind in ("linf", "box") else 0.15, seed=5)
    m64, x64 = copy.deepcopy(model).double(), x.double()
    b32 = certlab.bounds(model, x, th, method=method)
    b64 = certlab.bounds(m64, x64, th, method=method)
    assert b64.lower.dtype == b64.upper.dtype == torch.float64
    pts = _points(m64, x64, th, 5)
    assert pts.dtype == torch.float64
    with torch.no_grad():
        out = m64(pts.reshape(-1, *x.shape[1:])).reshape(pts.shape[0], x.shape[0], -1)
    assert (out >= b64.lower - 1e-12).all() and (out <= b64.upper + 1e-12).all()
    scale = 1 + b64.upper.abs().amax() + b64.lower.abs().amax()
    tol = 1e-5 * scale if method != "alpha-crown" else 1e-2 * scale  # α-CROWN's optimised slopes differ slightly
    assert (b32.lower.double() - b64.lower).abs().max() <= tol and (b32.upper.double() - b64.upper).abs().max() <= tol
