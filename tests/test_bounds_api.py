"""The bound engine's contract: shapes, bad input, unsupported layers, gradients and theory-guaranteed relations."""

import pytest
import torch
from torch import nn

import certlab
from certlab.errors import InputError, UnsupportedLayerError
from nets import cnn, mlp


@pytest.fixture
def net():
    return mlp(1, widths=(4, 16, 16, 3))


def test_public_api_shapes(net):
    x = torch.rand(5, 4)
    assert certlab.METHODS == ("ibp", "hbox", "deepz", "fastlin", "crown", "crown-ibp", "alpha-crown")
    b = certlab.bounds(net, x, certlab.LinfBall(0.05), method="crown")
    assert isinstance(b, certlab.Bounds) and b.lower.shape == (5, 3) and b.upper.shape == (5, 3)
    assert (b.lower <= b.upper).all()
    y = net(x).argmax(1)
    ok = certlab.certify(net, x, y, certlab.LinfBall(0.0))
    assert ok.dtype == torch.bool and ok.all()  # eps = 0 certifies every correctly classified point
    rb = certlab.bounds.relu_bounds(net, x, certlab.LinfBall(0.05), "crown")
    assert len(rb) == 2 and rb[0][0].shape == (5, 16)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: certlab.bounds(m, torch.rand(5, 7), certlab.LinfBall(0.1)), "expects 4 features"),
        (lambda m, x: certlab.bounds(m, x.masked_fill(x > 0.5, float("nan")), certlab.LinfBall(0.1)), "NaN"),
        (lambda m, x: certlab.bounds(m, x, certlab.LinfBall(-0.1)), "eps must be >= 0"),
        (lambda m, x: certlab.bounds(m, x, certlab.LinfBall(float("nan"))), "finite"),
        (lambda m, x: certlab.bounds(m, x, certlab.LinfBall(torch.tensor([0.1, float("nan")] * 2 + [0.1]))), "NaN"),
        (lambda m, x: certlab.bounds(m, x, certlab.LinfBall(torch.full((3,), 0.1))), "3 radii but the batch has 5"),
        (lambda m, x: certlab.bounds(m, x + 2.0, certlab.LinfBall(0.1)), "outside the domain"),
        (lambda m, x: certlab.bounds(m, x, certlab.LinfBall(0.1), C=torch.ones(5, 2, 4)), "C must have shape"),
        (lambda m, x: certlab.bounds(m, x, certlab.LinfBall(0.1), method="nope"), "unknown bound method"),
        (lambda m, x: certlab.bounds(m, x, "linf"), "threat must be"),
        (lambda m, x: certlab.margins(m, x, torch.tensor([0, 1]), certlab.LinfBall(0.1)), "y must have shape"),
        (lambda m, x: certlab.margins(m, x, torch.full((5,), 7), certlab.LinfBall(0.1)), "labels must lie in"),
        (lambda m, x: certlab.bounds(m, x[0], certlab.LinfBall(0.1)), "batch dimension"),
        (lambda m, x: certlab.bounds(m, x, certlab.LinfBall(0.1), method="crown-ibp", beta=2.0), "beta"),
    ],
)
def test_bad_input_raises_named_error(net, call, match):
    x = torch.rand(5, 4)
    with pytest.raises(InputError, match=match):
        call(net, x)


def test_domain_none_allows_any_input(net):
    x = torch.randn(3, 4) * 5
    b = certlab.bounds(net, x, certlab.LinfBall(0.1, domain=None), method="crown")
    assert torch.isfinite(b.lower).all()


class Weird(nn.Module):
    def forward(self, x):
        return x * 2


class MySeq(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 3


@pytest.mark.parametrize(
    "model, where",
    [
        (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), "'1' of type Tanh"),
        (nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.ReLU(), nn.Sequential(Weird())), nn.Linear(5, 3)), "'1.1.0' of type Weird"),
        (nn.Sequential(MySeq(nn.Linear(4, 3))), "overrides forward"),
        (nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (2, 4)), nn.Flatten(), nn.Linear(8, 3)), "Unflatten"),
    ],
)
@pytest.mark.parametrize("method", certlab.METHODS)
def test_unsupported_layer_names_path_and_type(model, where, method):
    with pytest.raises(UnsupportedLayerError, match=where):
        certlab.bounds(model, torch.rand(2, 4), certlab.LinfBall(0.1), method=method)


def test_forward_patched_on_an_instance_or_later_is_refused():
    """A layer whose forward was replaced on the instance, or on its class after a first bound call (the layer-class
    lookup is cached per type), is refused, not bounded as the layer it used to be."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.rand(2, 4)
    certlab.bounds(model, x, certlab.LinfBall(0.1), method="ibp")
    model[1].forward = lambda z: z  # the model now computes no ReLU
    with pytest.raises(UnsupportedLayerError, match="'1' .*overrides forward"):
        certlab.bounds(model, x, certlab.LinfBall(0.1), method="ibp")

    class Late(nn.ReLU):
        pass

    model = nn.Sequential(nn.Linear(4, 5), Late(), nn.Linear(5, 3))
    certlab.bounds(model, x, certlab.LinfBall(0.1), method="ibp")
    Late.forward = lambda self, z: z
    with pytest.raises(UnsupportedLayerError, match="overrides forward"):
        certlab.bounds(model, x, certlab.LinfBall(0.1), method="ibp")


def test_model_and_input_of_different_dtypes_is_a_one_line_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Sequential(nn.BatchNorm1d(5).eval(), nn.Linear(5, 3)))
    x, th = torch.rand(2, 4), certlab.LinfBall(0.1)
    for method in certlab.METHODS:
        with pytest.raises(InputError, match=r"layer '0' \(Linear\) holds torch.float32 tensors .* x is torch.float64"):
            certlab.bounds(model, x.double(), th, method=method)
    model[2][0].double()  # one inner layer converted: named by its path
    with pytest.raises(InputError, match=r"layer '2.0' \(BatchNorm1d\) holds torch.float64"):
        certlab.margins(model, x, torch.tensor([0, 1]), th, method="ibp")


def test_batchnorm_in_train_mode_needs_two_samples():
    from certlab.bounds.core import build_graph

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).train()
    x = torch.rand(1, 4)
    with pytest.raises(InputError, match="at least 2 samples"):
        certlab.bounds(model, x, certlab.LinfBall(0.1), method="ibp")
    with pytest.raises(InputError, match="at least 2 samples"):
        build_graph(model, x, full=True)  # the path certified training takes (clean logits from the bound pass)
    assert certlab.bounds(model.eval(), x, certlab.LinfBall(0.1), method="ibp").lower.shape == (1, 3)


def test_forward_hooks_are_refused():
    """A forward hook or pre-hook may change a layer's output (returning a new value, or editing it in place), and
    the bound engine does not run it: bounding such a model would bound another function. Refused, naming the
    layer; a removed hook is no obstacle."""
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, th = torch.rand(2, 4), certlab.LinfBall(0.1)
    for register, hook in ((model[2].register_forward_hook, lambda mod, inp, out: out * 10),
                           (model[2].register_forward_pre_hook, lambda mod, inp: (inp[0] * 10,))):
        h = register(hook)
        with pytest.raises(UnsupportedLayerError, match="'2' .*forward hooks"):
            certlab.bounds(model, x, th, method="crown")
        h.remove()
        certlab.bounds(model, x, th, method="crown")
    h = nn.modules.module.register_module_forward_hook(lambda mod, inp, out: None)
    try:
        with pytest.raises(UnsupportedLayerError, match="global module forward hooks"):
            certlab.bounds(model, x, th, method="ibp")
    finally:
        h.remove()
    certlab.bounds(model, x, th, method="ibp")


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("method", certlab.METHODS)
def test_gradients_reach_every_parameter(method, train_mode):
    model = cnn(2, bn=True, residual=True, normalize=True)
    model.train(train_mode)
    x = torch.rand(4, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 0])
    m = certlab.margins(model, x, y, certlab.LinfBall(0.03), method=method)
    loss = torch.nn.functional.cross_entropy(-m, y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{method}: no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"{method}: non-finite gradient for {name}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("threat", [certlab.LinfBall(0.05), certlab.L2Ball(0.3)])
def test_theory_relations(threat):
    """α-CROWN ≥ CROWN (it starts from CROWN's slopes); CROWN-IBP β interpolates IBP and CROWN-IBP;
    DeepZ and Fast-Lin agree on a one-hidden-layer net (same parallel relaxation), both at least as tight as IBP."""
    torch.manual_seed(0)
    model = mlp(5, widths=(6, 20, 20, 4))
    x = torch.rand(8, 6)
    cr = certlab.bounds(model, x, threat, "crown")
    ac = certlab.bounds(model, x, threat, "alpha-crown", iters=15)
    assert (ac.lower >= cr.lower - 1e-6).all() and (ac.upper <= cr.upper + 1e-6).all()
    assert (ac.lower > cr.lower + 1e-4).any(), "alpha optimisation should improve some bound"
    ibp = certlab.bounds(model, x, threat, "ibp")
    ci = certlab.bounds(model, x, threat, "crown-ibp")
    half = certlab.bounds(model, x, threat, "crown-ibp", beta=0.5)
    assert torch.allclose(half.lower, 0.5 * ibp.lower + 0.5 * ci.lower, atol=1e-5)
    assert torch.allclose(certlab.bounds(model, x, threat, "crown-ibp", beta=0.0).lower, ibp.lower)
    one = mlp(6, widths=(6, 20, 4))
    dz = certlab.bounds(one, x, threat, "deepz")
    fl = certlab.bounds(one, x, threat, "fastlin")
    ib1 = certlab.bounds(one, x, threat, "ibp")
    assert torch.allclose(dz.lower, fl.lower, atol=1e-4) and torch.allclose(dz.upper, fl.upper, atol=1e-4)
    assert (fl.lower >= ib1.lower - 1e-5).all()


@pytest.mark.parametrize("method", [m for m in certlab.METHODS if m != "ibp"])
def test_exact_when_no_neuron_crosses(method):
    """With every ReLU stable, the network is affine on the set: every symbolic method returns the exact range
    (IBP is not exact through two stacked affine maps, so it is not in this list; see the next test)."""
    model = mlp(7, widths=(4, 10, 10, 3))
    x = torch.rand(6, 4) * 0.5 + 0.25
    th = certlab.LinfBall(1e-4)
    pre = certlab.bounds.relu_bounds(model, x, th, "ibp")
    assert all(((l >= 0) | (u <= 0)).all() for l, u in pre), "test setup: a neuron crosses"
    b = certlab.bounds(model, x, th, method)
    # exact range of an affine map over a box: evaluate at the optimal vertex of each output
    W = torch.autograd.functional.jacobian(lambda z: model(z).sum(0), x)  # [K, B, n]
    lo, hi = th.interval_hull(x)
    for k in range(3):
        g = W[k]
        vmin = torch.where(g > 0, lo, hi)
        vmax = torch.where(g > 0, hi, lo)
        with torch.no_grad():
            assert torch.allclose(b.lower[:, k], model(vmin)[:, k], atol=1e-5)
            assert torch.allclose(b.upper[:, k], model(vmax)[:, k], atol=1e-5)


@pytest.mark.parametrize("method", certlab.METHODS)
def test_single_affine_layer_exact_for_every_method(method):
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    x = torch.rand(4, 5)
    th = certlab.LinfBall(0.1)
    b = certlab.bounds(model, x, th, method)
    lo, hi = th.interval_hull(x)
    W = model[0].weight
    with torch.no_grad():
        exact_lo = torch.stack([model(torch.where(W[k] > 0, lo, hi))[:, k] for k in range(3)], 1)
    assert torch.allclose(b.lower, exact_lo, atol=1e-5)


@pytest.mark.parametrize("B", [4, 8])  # 8 samples × 3 classes ≥ 2 × 3² table rows: the folded spec's table path
@pytest.mark.parametrize("kind", ["linf", "l2", "segments"])
@pytest.mark.parametrize("method", certlab.METHODS)
def test_relu_free_network_margins_sound(kind, method, B):
    """The margin spec folded straight into the first layer (no ReLU in between), for every set."""
    from nets import threat_for
    from certlab.bounds.ops import SpecLinearOp
    from certlab.bounds.spec import margin_table

    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    x = torch.rand(B, 5)
    y = torch.tensor([0, 1, 2, 0, 2, 2, 1, 0])[:B]
    assert SpecLinearOp(margin_table(y, 3, x.dtype)).tabled == (B == 8)
    th = threat_for(kind, x, 0.1 if kind == "linf" else 0.4)
    m = certlab.margins(model, x, y, th, method)
    pts = torch.cat([th.sample(x, 2000), x.unsqueeze(0)])
    with torch.no_grad():
        o = model(pts.reshape(-1, 5)).reshape(-1, B, 3)
    true = o.gather(2, y.view(1, B, 1).expand(o.shape[0], B, 1)) - o
    assert (true.min(0).values >= m - 1e-5).all()


def test_tighter_methods_are_tighter_on_average():
    model = mlp(9, widths=(8, 32, 32, 32, 4))
    x = torch.rand(16, 8)
    th = certlab.LinfBall(0.03)
    width = {m: (certlab.bounds(model, x, th, m).upper - certlab.bounds(model, x, th, m).lower).mean().item() for m in certlab.METHODS}
    assert width["crown"] < width["ibp"] and width["alpha-crown"] <= width["crown"] + 1e-6
    assert width["deepz"] < width["ibp"] and width["hbox"] <= width["ibp"] + 1e-6


def test_bounds_callable_module_is_also_a_package():
    import certlab.bounds.crown as crown_mod  # the folder layout stays importable

    assert callable(certlab.bounds) and crown_mod.__name__ == "certlab.bounds.crown"


@pytest.mark.parametrize("kind", ["linf", "l2", "segments"])
def test_patches_mode_equals_dense_back_substitution(kind, monkeypatch):
    """Conv-chain intermediate bounds by receptive-field patches are the dense back-substitution, to rounding."""
    from certlab.bounds import patches
    from nets import threat_for

    torch.manual_seed(0)
    model = nn.Sequential(
        certlab.nn.Normalize([0.4, 0.5], [0.3, 0.2]),
        nn.Conv2d(2, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 6, 3, stride=1, padding=2, dilation=2), nn.ReLU(),
        nn.AvgPool2d(2, 1, padding=1), nn.Conv2d(6, 4, 2, stride=2, padding=0, bias=False), nn.ReLU(),
        nn.Flatten(), nn.LazyLinear(3),
    )
    x = torch.rand(3, 2, 9, 9)
    model(x)
    with torch.no_grad():
        model[2].running_var.uniform_(0.5, 2.0)
    model.eval()
    th = threat_for(kind, x, 0.05 if kind == "linf" else 0.5)
    calls = []
    real_chain = patches.chain
    monkeypatch.setattr(patches, "chain", lambda g, s: calls.append(s) or real_chain(g, s))
    fast = certlab.bounds(model, x, th, "crown")
    assert any(real_chain(certlab.bounds.build_graph(model, x), s) for s in calls), "patches mode was not used"
    monkeypatch.setattr(patches, "chain", lambda g, s: None)
    dense = certlab.bounds(model, x, th, "crown")
    assert torch.allclose(fast.lower, dense.lower, atol=1e-5) and torch.allclose(fast.upper, dense.upper, atol=1e-5)


def _relu_first_residual(seed):
    """ReLUs whose input is also read by a residual shortcut (directly, and through a Flatten — a view), and a ReLU
    right after a Flatten."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Flatten(), nn.ReLU(), nn.Linear(3 * 5 * 5, 8),
        certlab.nn.Residual(nn.Sequential(nn.ReLU(), nn.Linear(8, 8))), nn.ReLU(), nn.Linear(8, 8),
        certlab.nn.Residual(nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Linear(8, 8)), shortcut=nn.Flatten()),
        nn.ReLU(), nn.Linear(8, 3),
    ).eval()


@pytest.mark.parametrize("kind", ["linf", "l2", "segments"])
@pytest.mark.parametrize("which", ["relu-first-residual", "cnn-residual", "mlp-residual"])
def test_ibp_in_place_pass_equals_recorded_pass(kind, which):
    """Without gradients the interval pass works in place on tensors nothing else holds; it must give the same
    bounds as the pass autograd records (which never works in place on shared values), and leave x alone."""
    from nets import threat_for

    if which == "relu-first-residual":
        model, x = _relu_first_residual(0), torch.rand(6, 1, 5, 5)
    elif which == "cnn-residual":
        model, x = cnn(1, residual=True, normalize=True, pool=True), torch.rand(6, 1, 6, 6)
    else:
        model, x = mlp(2, widths=(4, 8, 8, 8, 3), residual=True), torch.rand(6, 4)
    threat = threat_for(kind, x, 0.3)
    x0 = x.clone()
    ref = certlab.bounds(model, x, threat, method="ibp")  # parameters require grad: the recorded pass
    assert ref.lower.requires_grad
    with torch.no_grad():
        got = certlab.bounds(model, x, threat, method="ibp")
    assert torch.equal(x, x0)
    torch.testing.assert_close(got.lower, ref.lower.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.upper, ref.upper.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("build", [
    lambda: (cnn(3, residual=True, normalize=True, pool=True, size=7), (1, 7, 7)),
    lambda: (nn.Sequential(nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
                           nn.ReLU(), nn.AvgPool2d(3, 2, padding=1), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)), (2, 9, 8)),
    lambda: (__import__("certlab").models.build("wong-resnet", (3, 16, 16), 10), (3, 16, 16)),
    lambda: (__import__("certlab").models.build("convplus", (1, 28, 28), 10), (1, 28, 28)),
])
def test_graph_shapes_without_a_forward_match_the_model(build):
    """build_graph infers each node's shape from the layers' arithmetic; it must agree with a real forward pass."""
    from certlab.bounds import core

    model, shape = build()
    model.eval()
    x = torch.rand(2, *shape)
    shapes = [n.shape for n in core.build_graph(model, x).nodes]
    assert shapes == [n.shape for n in core.build_graph(model, x, full=True).nodes]
    assert shapes[-1] == tuple(model(x).shape[1:])


def test_pooling_window_larger_than_input_is_a_named_error():
    model = nn.Sequential(nn.Conv2d(1, 2, 5), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(InputError, match=r"'0' \(Conv2d\).*smaller than its window"):
        certlab.bounds(model, torch.rand(1, 1, 4, 4), certlab.LinfBall(0.1), method="ibp")
