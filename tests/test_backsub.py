"""Fast-Lin's one-pass lower+upper back-substitution equals the two-pass (rows A and −A) computation."""

import pytest
import torch
import certlab

from certlab.bounds import backsub
from certlab.bounds.core import build_graph

from nets import cnn, mlp, threat_for


@pytest.mark.parametrize("kind", ["linf", "l2", "segments"])
@pytest.mark.parametrize("net", ["cnn", "cnn-bn", "mlp"])
def test_parallel_one_pass_matches_two_passes(kind, net):
    torch.manual_seed(0)
    if net == "mlp":
        model, x = mlp(1, widths=(6, 12, 12, 12, 4)), torch.rand(5, 6)
    else:  # two convolutions: the second one's neurons go through the patches path
        model, x = cnn(2, bn=net == "cnn-bn", size=8), torch.rand(5, 1, 8, 8)
    threat = threat_for(kind, x, 0.3 if kind != "linf" else 0.1)
    g = build_graph(model, x)
    ibp_pre = {}
    pre = backsub.intermediate(g, x, threat, lower="parallel", reference=ibp_pre)
    B = x.shape[0]
    checked = 0
    for r in g.relus:
        p = g.nodes[r].inputs[0]
        shape = g.nodes[p].shape
        n = int(torch.tensor(shape).prod())
        eye = torch.eye(n).expand(B, n, n).reshape(B, n, *shape)
        # reference: dense rows A and −A, lower bounds only, the earlier layers' bounds as computed
        low = backsub.lower_bound(g, p, torch.cat([eye, -eye], 1), pre, x, threat, "parallel")
        ref_l, ref_u = low[:, :n], -low[:, n:]
        l, u = (t.reshape(B, -1) for t in pre[r])
        il, iu = (t.reshape(B, -1) for t in ibp_pre[r])
        unstable = (il < 0) & (iu > 0)  # only these are refined; the rest keep IBP's bounds (IBP from the earlier
        # layers' refined bounds)
        assert torch.allclose(l[unstable], torch.maximum(il, ref_l)[unstable], atol=1e-5, rtol=1e-5)
        assert torch.allclose(u[unstable], torch.minimum(iu, ref_u)[unstable], atol=1e-5, rtol=1e-5)
        checked += int(unstable.sum())
        # the dense one-pass path too
        lo1, up1 = backsub.both_bounds(g, p, eye, pre, x, threat, "parallel")
        assert torch.allclose(lo1, ref_l, atol=1e-5, rtol=1e-5) and torch.allclose(up1, ref_u, atol=1e-5, rtol=1e-5)
    assert checked > 0  # the comparison covered refined neurons


def test_one_pass_refuses_non_parallel_lines():
    model, x = mlp(0), torch.rand(2, 4)
    g = build_graph(model, x)
    pre = backsub.intermediate(g, x, threat_for("linf", x, 0.1), lower="adaptive")
    A = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="parallel"):
        backsub.lower_bound(g, len(g.nodes) - 1, A, pre, x, threat_for("linf", x, 0.1), "adaptive", upper=True)


@pytest.mark.parametrize("kind", ["linf", "l2", "segments"])
@pytest.mark.parametrize("lower", ["adaptive", "parallel"])
@pytest.mark.parametrize("net", ["cnn", "cnn-bn", "cnn-norm-pool", "cnn-2ch"])
def test_patches_grouped_by_position_equal_dense_rows(kind, lower, net):
    """patches.bounds_all (every neuron of a convolution, patches grouped by position, rows shared by the batch until
    the first ReLU, no padding mask at the input for box and segment sets) equals dense back-substitution of the
    identity rows, for every neuron, threat set and lower line; and intermediate() takes it when most neurons need
    bounds, the per-row path when few do."""
    torch.manual_seed(0)
    ch, size = (2, 7) if net == "cnn-2ch" else (1, 8)
    model = cnn(3, bn=net == "cnn-bn", normalize=net == "cnn-norm-pool", pool=net == "cnn-norm-pool", channels=ch,
                size=size)
    x = torch.rand(4, ch, size, size)
    threat = threat_for(kind, x, 0.3 if kind != "linf" else 0.1)
    g = build_graph(model, x)
    with torch.no_grad():
        _check_grouped(g, x, threat, lower)


def _check_grouped(g, x, threat, lower):
    from certlab.bounds import patches

    pre = backsub.intermediate(g, x, threat, lower=lower)
    B, checked = x.shape[0], 0
    for r in g.relus:
        p = g.nodes[r].inputs[0]
        path = patches.chain(g, p)
        if path is None:
            continue
        shape = g.nodes[p].shape
        n = int(torch.tensor(shape).prod())
        eye = torch.eye(n).expand(B, n, n).reshape(B, n, *shape)
        low = backsub.lower_bound(g, p, torch.cat([eye, -eye], 1), pre, x, threat, lower)
        lo, hi = patches.bounds_all(g, p, path, pre, x, threat, lower)
        scale = max(1.0, float(low.abs().max()))
        torch.testing.assert_close(lo.reshape(B, -1), low[:, :n], atol=1e-6 * scale, rtol=1e-5)
        torch.testing.assert_close(hi.reshape(B, -1), -low[:, n:], atol=1e-6 * scale, rtol=1e-5)
        checked += 1
    # every ReLU after a convolution, BatchNorm between them or not (a chain that starts at a BatchNorm node: CNN7's
    # layers fell back to dense rows, 62 GB for Fast-Lin on one CNN7 sample)
    assert checked == sum(len(g.nodes[g.nodes[r].inputs[0]].shape) == 3 for r in g.relus) >= 2


def test_intermediate_picks_grouped_patches_when_most_neurons_are_unstable(monkeypatch):
    from certlab import LinfBall
    from certlab.bounds import patches

    calls = {"all": 0, "rows": 0}

    def counted(name, fn):
        def call(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return call

    monkeypatch.setattr(patches, "bounds_all", counted("all", patches.bounds_all))
    monkeypatch.setattr(patches, "lower_rows", counted("rows", patches.lower_rows))
    model, x = cnn(3, size=8), torch.rand(4, 1, 8, 8)
    g = build_graph(model, x)
    backsub.intermediate(g, x, LinfBall(0.3))  # wide box: nearly every neuron crosses
    assert calls == {"all": 1, "rows": 0}
    backsub.intermediate(g, x, LinfBall(1e-3))  # tiny box: few do
    assert calls["all"] == 1 and calls["rows"] <= 1


@pytest.mark.parametrize("lower", ["adaptive", "parallel"])
def test_interval_reference_starts_from_the_refined_bounds_of_earlier_layers(lower):
    """The IBP bounds each layer's refinement starts from are propagated from the earlier layers' refined bounds:
    never wider than plain IBP's, narrower for deeper layers (fewer neurons left to back-substitute), and the
    refined bounds lie inside them."""
    from certlab import LinfBall
    from certlab.bounds.ibp import interval_pass

    torch.manual_seed(0)
    model, x = mlp(4, widths=(6, 16, 16, 16, 3)), torch.rand(8, 6)
    threat = LinfBall(0.15)
    g = build_graph(model, x)
    ref = {}
    pre = backsub.intermediate(g, x, threat, lower=lower, reference=ref)
    plain = interval_pass(g, x, threat)[0]
    narrower = 0
    for k, r in enumerate(g.relus):
        (rl, ru), (pl, pu), (l, u) = ref[r], plain[r], pre[r]
        assert (rl >= pl - 1e-6).all() and (ru <= pu + 1e-6).all()
        assert (l >= rl - 1e-6).all() and (u <= ru + 1e-6).all()
        if k >= 1:
            narrower += int(((ru - rl) < (pu - pl) - 1e-5).sum())
    assert narrower > 0
    crossing = lambda lo, up: int(((lo < 0) & (up > 0)).sum())  # noqa: E731
    r = g.relus[-1]
    assert crossing(*ref[r]) < crossing(*plain[r])


def _strided_net(seed, k1, s1, p1, k2, s2, p2, size, bn, extra):
    import torch.nn as nn

    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 3, k1, stride=s1, padding=p1), nn.ReLU()]
    if bn:
        layers += [nn.BatchNorm2d(3), nn.ReLU()]
    layers += [nn.Conv2d(3, 4, k2, stride=s2, padding=p2), nn.ReLU()]
    if extra:  # a third strided convolution: the stride product passes phased.MAX_FACTOR
        layers += [nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU()]
    layers += [nn.Flatten()]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        n = model(torch.zeros(1, 2, size, size)).shape[1]
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(*layers, nn.Linear(n, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    return model


@pytest.mark.parametrize("lower", ["adaptive", "parallel"])
@pytest.mark.parametrize("cfg", [
    (4, 2, 1, 4, 2, 1, 12, False, False),  # the small MNIST CNN's geometry
    (3, 2, 1, 3, 2, 0, 11, False, False),  # kernel not a multiple of the stride; rows no output reaches
    (5, 3, 2, 2, 2, 0, 13, True, False),   # stride 3, BatchNorm between (rows go plain there)
    (1, 2, 0, 4, 2, 2, 10, False, True),   # 1×1 kernel; a third stride-2 convolution (stride product 8)
    (3, 1, 1, 4, 2, 1, 9, False, False),   # a stride-1 convolution first (not phased)
])
def test_phased_rows_equal_transposed_convolutions(cfg, lower):
    """Dense rows back through strided convolutions in the polyphase layout (phased.py) give the same bounds as the
    plain transposed convolutions, for every threat set, with lower and upper rows in one or two passes."""
    model = _strided_net(5, *cfg)
    size = cfg[6]
    x = torch.rand(3, 2, size, size)
    for kind in ("linf", "l2", "segments"):
        threat = threat_for(kind, x, 0.3 if kind != "linf" else 0.1)
        g = build_graph(model, x)
        pre = backsub.intermediate(g, x, threat, lower=lower)
        start = len(g.nodes) - 1
        A = torch.randn(3, 5, 3)
        for upper in ((False, True) if lower == "parallel" else (False,)):
            got = backsub.lower_bound(g, start, A, pre, x, threat, lower, upper=upper)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(backsub, "PHASED", False)
                ref = backsub.lower_bound(g, start, A, pre, x, threat, lower, upper=upper)
            for a_, b_ in zip(got if upper else (got,), ref if upper else (ref,)):
                scale = max(1.0, float(b_.detach().abs().max()))
                torch.testing.assert_close(a_, b_, atol=2e-6 * scale, rtol=1e-5)


@pytest.mark.parametrize("method", ["fastlin", "crown", "crown-ibp", "alpha-crown"])
def test_phased_rows_through_convolutions_without_bias(method):
    """A strided convolution without a bias, and a one-channel AvgPool2d (a convolution with no bias), in the
    polyphase path: the same bounds as the transposed convolutions (once crashed: the bias sum read op.b)."""
    import torch.nn as nn

    import certlab

    torch.manual_seed(0)
    x = torch.rand(3, 1, 12, 12)
    nets = [nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, bias=False), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)),
            nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(36, 3))]
    for model in nets:
        model.eval()
        got = certlab.bounds(model, x, certlab.LinfBall(0.1), method=method)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(backsub, "PHASED", False)
            ref = certlab.bounds(model, x, certlab.LinfBall(0.1), method=method)
        torch.testing.assert_close(got.lower, ref.lower, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.upper, ref.upper, atol=1e-5, rtol=1e-5)


def test_phased_rows_are_used_and_keep_gradients(monkeypatch):
    """The polyphase path is taken for a strided convolution after a ReLU, and gradients through it equal those
    through the transposed convolutions."""
    from certlab.bounds import phased

    calls = {"n": 0}
    real = phased.back

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(phased, "back", counted)
    model = _strided_net(1, 4, 2, 1, 4, 2, 1, 12, False, False)
    x = torch.rand(2, 2, 12, 12)
    threat = threat_for("linf", x, 0.05)
    grads = []
    for flag in (True, False):
        monkeypatch.setattr(backsub, "PHASED", flag)
        model.zero_grad()
        g = build_graph(model, x)
        pre = backsub.intermediate(g, x, threat)
        lo, hi = backsub.output(g, x, threat, pre)
        (lo.sum() - hi.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert calls["n"] >= 2  # the second convolution, and the first from phased rows
    for a_, b_ in zip(*grads):
        torch.testing.assert_close(a_, b_, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lower", ["adaptive", "parallel"])
def test_relu_lines_match_the_case_definitions_and_bound_relu(lower, dtype):
    """relu_lines computes its lines with arithmetic only; they equal the case-by-case definitions (chord for crossing
    neurons, identity for active, zero for dead, the adaptive lower slope 1[u > −l]) and enclose relu on [l, u]."""
    torch.manual_seed(0)
    l = torch.randn(4000, dtype=dtype) * 2
    u = l + torch.rand(4000, dtype=dtype) * 3
    # the edges: l = u = 0, l = 0 < u, l < 0 = u, l = u (both signs), u = −l, and widths near float resolution
    el = torch.tensor([0.0, 0.0, -1.0, 2.0, -2.0, -1.5, -1e-30, 3.0, -1e-7], dtype=dtype)
    eu = torch.tensor([0.0, 1.0, 0.0, 2.0, -2.0, 1.5, 1e-30, 3.0 + 1e-6, 1e-7], dtype=dtype)
    l, u = torch.cat([l, el]), torch.cat([u, eu])
    a, s, t, crossing = backsub.relu_lines(l, u, lower, crossing=True)
    assert torch.equal(crossing, (l < 0) & (u > 0))
    active, dead = l >= 0, u <= 0
    chord = u / (u - l)
    assert torch.equal(s[crossing], chord[crossing])
    assert torch.equal(t[crossing], (-l * chord)[crossing])
    assert bool((s[active & (u > 0)] == 1).all()) and bool((s[dead] == 0).all()) and bool((t[~crossing] == 0).all())
    want_a = s if lower == "parallel" else torch.where(crossing, (u > -l).to(dtype), (l >= 0).to(dtype))
    keep = ~((l == 0) & (u == 0))  # a neuron fixed at 0: any slope is exact there
    assert torch.equal(a[keep], want_a[keep])
    assert bool(((a >= 0) & (a <= 1) & (s >= 0) & (s <= 1)).all())
    z = l.unsqueeze(1) + (u - l).unsqueeze(1) * torch.linspace(0, 1, 11, dtype=dtype)  # points of [l, u]
    r = z.clamp(min=0)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert bool((a.unsqueeze(1) * z <= r + tol * (1 + z.abs())).all())
    assert bool((s.unsqueeze(1) * z + t.unsqueeze(1) >= r - tol * (1 + z.abs())).all())


@pytest.mark.parametrize("method", ["crown-ibp", "crown", "fastlin"])
def test_bound_gradients_match_finite_differences(method):
    """In grad mode the ReLU step takes Λ⁻ as (Λ − |Λ|)/2 (abs's backward is cheaper than clamp's on CPU): the
    gradients of the bounds (two-pass CROWN steps, one-pass Fast-Lin steps) agree with central finite differences,
    in the input and in parameters of every layer (float64, a small CNN whose strided convolutions take the
    polyphase path)."""
    torch.manual_seed(3)
    model = _strided_net(1, 4, 2, 1, 4, 2, 1, 10, False, False).double()
    x0 = torch.rand(2, 2, 10, 10, dtype=torch.float64)
    threat = certlab.LinfBall(0.05, domain=None)

    def bound(x):
        b = certlab.bounds(model, x, threat, method=method)
        return torch.cat([b.lower.reshape(-1), b.upper.reshape(-1)])

    with_grad = bound(x0)  # the parameters require grad: the grad-mode step; its bounds equal the no-grad ones
    assert with_grad.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(with_grad.detach(), bound(x0), atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(bound, (x0.clone().requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-4)
    w = torch.randn(12, dtype=torch.float64)  # a random functional of the bounds
    model.zero_grad()
    (bound(x0) * w).sum().backward()
    for p in model.parameters():
        for k in torch.randperm(p.numel())[:3].tolist():
            with torch.no_grad():
                old = p.view(-1)[k].item()
                p.view(-1)[k] = old + 1e-6
                hi = (bound(x0) * w).sum().item()
                p.view(-1)[k] = old - 1e-6
                lo = (bound(x0) * w).sum().item()
                p.view(-1)[k] = old
            assert abs((hi - lo) / 2e-6 - p.grad.view(-1)[k].item()) <= 1e-5 + 1e-4 * abs(p.grad.view(-1)[k].item())


@pytest.mark.parametrize("eps", [0.01, 0.2])  # few unstable neurons (per-row patches) and most (grouped by position)
@pytest.mark.parametrize("lower", ["adaptive", "parallel"])
def test_patches_in_chunks_equal_patches_at_once(eps, lower, monkeypatch):
    """When the patches would outgrow patches.PATCH_BUDGET, rows (or positions) are back-substituted a chunk at a
    time: the same bounds, here with one row or position per chunk."""
    from certlab.bounds import patches

    torch.manual_seed(0)
    model, x = cnn(3, bn=True, size=8), torch.rand(3, 1, 8, 8)
    threat = threat_for("linf", x, eps)
    g = build_graph(model, x)
    with torch.no_grad():
        whole = backsub.intermediate(g, x, threat, lower=lower)
        sizes = []
        real = patches._in_chunks
        monkeypatch.setattr(patches, "_in_chunks", lambda n, k, run: sizes.append(k) or real(n, k, run))
        monkeypatch.setattr(patches, "PATCH_BUDGET", 1)
        chunked = backsub.intermediate(g, x, threat, lower=lower)
    assert sizes and set(sizes) == {1}
    for r in g.relus:
        torch.testing.assert_close(chunked[r][0], whole[r][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(chunked[r][1], whole[r][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linf", "l2", "segments", "box"])
@pytest.mark.parametrize("net", ["mlp", "mlp-residual", "cnn", "cnn-bn", "cnn-residual"])
@pytest.mark.parametrize("method", ["deepz", "hbox"])
def test_symbolic_backward_form_equals_forward_form(method, kind, net):
    """DeepZ and hBox computed by back-substitution (DeepZ: parallel lines over its own bounds, no IBP
    intersection; hBox: masks, with the boxes' centres and radii carried forward) give the forward forms' numbers,
    for the pre-activation bounds of every ReLU and for the output, on chains, convolutions (patches), BatchNorm and
    residual sums; ``compute`` returns the form ``backward_is_cheaper`` picks."""
    from certlab.bounds import deepz, hbox
    from certlab.bounds.symbolic import backward_is_cheaper

    torch.manual_seed(0)
    if net.startswith("mlp"):
        model, x = mlp(3, widths=(6, 12, 12, 12, 4), residual=net == "mlp-residual"), torch.rand(4, 6)
    else:
        model, x = cnn(3, bn=net == "cnn-bn", residual=net == "cnn-residual", size=8), torch.rand(4, 1, 8, 8)
    model, x = model.double(), x.double()
    threat = threat_for(kind, x, 0.3 if kind in ("l2", "segments") else 0.1)
    g = build_graph(model, x)
    mod = {"deepz": deepz, "hbox": hbox}[method]
    with torch.no_grad():
        pre_f, (lo_f, up_f) = mod.forward(g, x, threat)
        if method == "deepz":
            pre_b = backsub.intermediate(g, x, threat, lower="parallel", intersect=False)
            lo_b, up_b = backsub.output(g, x, threat, pre_b, lower="parallel")
        else:
            pre_b, (lo_b, up_b) = hbox.backward(g, x, threat)
        lo_c, up_c = mod.compute(g, x, threat)
    crossing = 0
    for r in g.relus:
        for a, b in zip(pre_f[r], pre_b[r]):
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)
        crossing += int(((pre_f[r][0] < 0) & (pre_f[r][1] > 0)).sum())
    assert crossing > 0  # the relaxation was exercised
    assert torch.allclose(lo_f, lo_b, atol=1e-10, rtol=1e-10) and torch.allclose(up_f, up_b, atol=1e-10, rtol=1e-10)
    assert torch.equal(lo_c, lo_b if backward_is_cheaper(g, x, threat) else lo_f)


def test_symbolic_forms_chosen_by_cost():
    from certlab.bounds.symbolic import backward_is_cheaper
    from certlab.models import build

    x = torch.rand(2, 1, 28, 28)
    assert backward_is_cheaper(build_graph(build("conv", (1, 28, 28), 10), x), x, certlab.LinfBall(0.1))
    xr = torch.rand(2, 1, 12, 12)
    assert not backward_is_cheaper(build_graph(build("wong-resnet", (1, 12, 12), 10), xr), xr, certlab.LinfBall(0.1))
