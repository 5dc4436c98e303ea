"""Tests of certlab.attacks: feasibility, optimality on linear models, exact segment search, strength, hygiene."""

import gc

import pytest
import torch

import certlab
import certlab.attacks as A
from certlab import L2Ball, LinfBall, SegmentUnion
from certlab.errors import CertlabError, InputError


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; tiny models are faster single-threaded
    yield
    torch.set_num_threads(n)


def _linear(w):
    """Binary linear classifier with logits (−w·x/2, w·x/2): margin of class 1 is w·x."""
    m = torch.nn.Linear(w.numel(), 2)
    with torch.no_grad():
        m.weight.copy_(torch.stack([-w, w]) / 2)
        m.bias.zero_()
    return m


def _mlp(d, k, h=32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(),
                               torch.nn.Linear(h, k))


def _margin(model, x, y):
    with torch.no_grad():
        return A.margin(model(x), y)


BALL_METHODS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t")


# -- feasibility ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", BALL_METHODS)
@pytest.mark.parametrize("kind", ["linf", "l2"])
def test_outputs_inside_set_per_sample_eps_and_domain(method, kind):
    torch.manual_seed(1)
    model = _mlp(12, 5)
    x = torch.rand(6, 12)
    x[0, :6] = 0.0  # on the domain boundary: the ball sticks out of [0, 1]
    x[1, :6] = 1.0
    y = torch.randint(0, 5, (6,))
    eps = torch.tensor([0.3, 0.5, 0.0, 0.05, 0.2, 1.0]) * (1.0 if kind == "linf" else 3.0)
    threat = (LinfBall if kind == "linf" else L2Ball)(eps)
    xa = A.run(model, x, y, threat, method=method, steps=15, restarts=2)
    assert xa.shape == x.shape and not xa.requires_grad
    assert threat.contains(xa, x, tol=1e-5).all()
    assert xa.min() >= 0.0 and xa.max() <= 1.0  # the domain exactly
    assert torch.equal(xa[2], x[2])  # eps = 0 for this sample
    if kind == "linf":
        assert ((xa - x).abs().amax(1) <= eps + 1e-6).all()
    else:
        assert ((xa - x).norm(dim=1) <= eps + 1e-5).all()
    # the returned point is never worse than the clean one
    assert (_margin(model, xa, y) <= _margin(model, x, y) + 1e-6).all()


@pytest.mark.parametrize("method", A.METHODS)
def test_segments_inside_set_all_methods_route_to_line_search(method):
    torch.manual_seed(2)
    model = _mlp(8, 3)
    x = torch.rand(5, 8)
    x[0, 0] = 1.0
    d = torch.randn(5, 3, 8)  # per-sample directions, k = 3
    threat = SegmentUnion(d, torch.tensor([0.5, 0.0, 1.0, 2.0, 0.3]), domain=(0.0, 1.0))
    y = torch.randint(0, 3, (5,))
    xa = A.run(model, x, y, threat, method=method)
    assert threat.contains(xa, x).all()
    assert xa.min() >= -1e-6 and xa.max() <= 1 + 1e-6
    assert torch.allclose(xa[1], x[1])
    ref = A.run(model, x, y, threat, method="segment")
    assert torch.equal(xa, ref)  # every method is the same exact search


# -- optimality on linear models ------------------------------------------------------------------------
def _linear_problem(n=10, B=6, seed=3):
    torch.manual_seed(seed)
    w = torch.randn(n)
    x = 0.5 + 0.1 * torch.rand(B, n) - 0.05
    y = (x @ w > 0).long()
    s = torch.where(y == 1, 1.0, -1.0).view(-1, 1)  # the adversary lowers s·w·x
    return _linear(w), w, x, y, s


@pytest.mark.parametrize("method", BALL_METHODS)
def test_linf_linear_reaches_analytic_optimum(method):
    model, w, x, y, s = _linear_problem()
    eps = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.5, 0.7])  # large radii hit the domain: optimum is clipped
    xa = A.run(model, x, y, LinfBall(eps), method=method)
    opt = (x - eps.view(-1, 1) * s * w.sign()).clamp(0, 1)
    assert torch.allclose(xa, opt, atol=1e-5)


@pytest.mark.parametrize("method", ["apgd-ce", "apgd-dlr", "apgd-t", "pgd"])
def test_l2_linear_reaches_analytic_optimum(method):
    model, w, x, y, s = _linear_problem()
    eps = torch.tensor([0.01, 0.03, 0.05, 0.08, 0.1, 0.12])  # small enough to stay inside [0, 1]
    kw = {"steps": 100} if method == "pgd" else {}
    xa = A.run(model, x, y, L2Ball(eps), method=method, **kw)
    opt = x - eps.view(-1, 1) * s * w / w.norm()
    assert (opt >= 0).all() and (opt <= 1).all()
    # worst-case margin s·w·x − ε‖w‖ (fixed-step PGD from a random start converges only slowly in ℓ2)
    rel = 2e-2 if method == "pgd" else 1e-3
    worst = (x * s * w).sum(1) - eps * w.norm()
    reached = (xa * s * w).sum(1)
    assert (reached >= worst - 1e-5).all()  # nothing beats the optimum (sanity of the set)
    assert (reached <= worst + rel * eps * w.norm()).all(), ((reached - worst) / (eps * w.norm())).max()
    if method != "pgd":
        assert torch.allclose(xa, opt, atol=1e-3)


# -- exact line search -------------------------------------------------------------------------------------
def test_segment_search_matches_brute_force():
    torch.manual_seed(4)
    model = _mlp(6, 4, h=24)
    B, k = 8, 3
    x = torch.rand(B, 6)
    y = model(x).argmax(1).detach()
    d = torch.randn(k, 6)
    threat = SegmentUnion(d, torch.linspace(0.2, 1.5, B), domain=(0.0, 1.0))
    xa = A.run(model, x, y, threat)
    m_attack = _margin(model, xa, y)
    # brute force: 20001 points per segment
    dirs = threat.directions_for(x)
    blo, bhi = threat.beta_range(x)
    t = torch.linspace(0, 1, 20001)
    m_brute = torch.full((B,), float("inf"))
    with torch.no_grad():
        for j in range(k):
            beta = blo[:, j:j + 1] + (bhi - blo)[:, j:j + 1] * t  # [B, T]
            pts = x.unsqueeze(1) + beta.unsqueeze(-1) * dirs[:, j].unsqueeze(1)
            mm = A.margin(model(pts.reshape(-1, 6)), y.repeat_interleave(t.numel())).view(B, -1)
            m_brute = torch.minimum(m_brute, mm.min(1).values)
    assert (m_attack <= m_brute + 1e-4).all(), (m_attack - m_brute).max()
    assert (m_attack >= m_brute - 1e-2).all()  # brute force is a fine grid of the same set


def test_segment_refuses_balls():
    model = _mlp(4, 2)
    with pytest.raises(InputError, match="SegmentUnion"):
        A.run(model, torch.rand(2, 4), torch.zeros(2, dtype=torch.long), LinfBall(0.1), method="segment")


# -- strength ---------------------------------------------------------------------------------------------
def _trained_mlp():
    torch.manual_seed(5)
    d = 10
    centers = torch.randn(2, d)
    X = torch.cat([centers[0] + 0.8 * torch.randn(300, d), centers[1] + 0.8 * torch.randn(300, d)])
    Y = torch.cat([torch.zeros(300), torch.ones(300)]).long()
    X = (X - X.min()) / (X.max() - X.min())  # into [0, 1]
    model = _mlp(d, 2, h=48, seed=6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    return model, X, Y


def test_apgd_at_least_as_strong_as_pgd20_on_trained_mlp():
    model, X, Y = _trained_mlp()
    x, y = X[::3], Y[::3]
    with torch.no_grad():
        clean_err = (model(x).argmax(1) != y).float().mean().item()
    assert clean_err < 0.15  # the model learned something
    threat = LinfBall(0.1)
    err_pgd = A.robust_error(model, x, y, threat, attacks=("pgd",))
    err_apgd = A.robust_error(model, x, y, threat, attacks=("apgd-ce", "apgd-t"))
    assert 0.1 < err_apgd.float().mean() < 0.9  # an informative radius
    assert err_apgd.sum() >= err_pgd.sum()
    # a point fooled by PGD-20 is also fooled by the ensemble on this easy model
    assert (err_apgd | ~err_pgd).float().mean() >= 0.98


def test_robust_error_counts_clean_errors_and_returns_adversarial_points():
    torch.manual_seed(7)
    model = _mlp(8, 4)
    x = torch.rand(20, 8)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:5] = (pred[:5] + 1) % 4  # five clean errors
    threat = L2Ball(0.5)
    err, xa = A.robust_error(model, x, y, threat, attacks=("apgd-ce", "apgd-dlr", "apgd-t"), steps=30,
                             return_adv=True)
    assert err.dtype == torch.bool and err.shape == (20,)
    assert err[:5].all()
    assert threat.contains(xa, x).all()
    adv = err.clone()
    adv[:5] = False
    assert (A.attack_success(model, xa[adv], y[adv])).all()
    assert torch.equal(xa[~err], x[~err])
    assert torch.equal(err, A.robust_error(model, x, y, threat, attacks=("apgd-ce", "apgd-dlr", "apgd-t"),
                                           steps=30))  # deterministic


def test_robust_error_on_segments_matches_run():
    torch.manual_seed(8)
    model = _mlp(5, 3)
    x = torch.rand(10, 5)
    y = model(x).argmax(1).detach()
    threat = SegmentUnion(torch.randn(2, 5), 0.8, domain=(0.0, 1.0))
    err = A.robust_error(model, x, y, threat)
    xa = A.run(model, x, y, threat)
    assert torch.equal(err, A.attack_success(model, xa, y))


# -- eps = 0, hygiene ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("threat", [LinfBall(0.0), L2Ball(0.0), SegmentUnion(torch.randn(2, 6), 0.0, domain=(0, 1))])
def test_eps_zero_returns_x(threat):
    torch.manual_seed(9)
    model = _mlp(6, 3)
    x = torch.rand(4, 6)
    y = torch.randint(0, 3, (4,))
    for method in ("pgd", "apgd-t") if threat.norm != "segments" else ("segment",):
        assert torch.allclose(A.run(model, x, y, threat, method=method, steps=5), x, atol=1e-7)


def test_mode_restored_no_param_grads_private_rng():
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))
    model.train()
    model[2].eval()  # mixed modes must come back as they were
    x = torch.rand(4, 6)
    y = torch.randint(0, 3, (4,))
    state = torch.get_rng_state()
    with torch.no_grad():  # attacks must work inside no_grad too
        xa = A.run(model, x, y, LinfBall(0.1), method="apgd-ce", steps=10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m.training for m in model] == [True, True, False, True]
    assert all(p.grad is None for p in model.parameters())
    xb = A.run(model, x, y, LinfBall(0.1), method="apgd-ce", steps=10, seed=3)
    assert torch.equal(xa, xb)  # same seed, same point (and dropout was off)


def test_bad_inputs_raise_certlab_errors():
    model = _mlp(4, 3)
    x = torch.rand(3, 4)
    y = torch.tensor([0, 1, 2])
    t = LinfBall(0.1)
    with pytest.raises(InputError, match="unknown attack method"):
        A.run(model, x, y, t, method="fgsm")
    with pytest.raises(InputError, match="NaN"):
        A.run(model, torch.tensor([[float("nan")] * 4] * 3), y, t)
    with pytest.raises(InputError, match="shape"):
        A.run(model, x, y[:2], t)
    with pytest.raises(InputError, match="integer"):
        A.run(model, x, y.float(), t)
    with pytest.raises(InputError, match="labels"):
        A.run(model, x, torch.tensor([0, 1, 7]), t)
    with pytest.raises(InputError, match="steps"):
        A.run(model, x, y, t, method="pgd", steps=0)
    with pytest.raises(InputError, match="unknown option"):
        A.run(model, x, y, t, method="pgd", grid=5)
    with pytest.raises(InputError, match="threat"):
        A.run(model, x, y, 0.1)
    with pytest.raises(InputError, match="eps has 2 radii"):
        A.run(model, x, y, LinfBall(torch.tensor([0.1, 0.2])))
    with pytest.raises(InputError, match="logits"):
        A.run(lambda z: z.sum(1), x, y, t)
    with pytest.raises(CertlabError, match="unknown attack method"):
        A.robust_error(model, x, y, t, attacks=("apgd-ce", "cw"))
    with pytest.raises(InputError, match="rho"):
        A.run(model, x, y, t, method="apgd-ce", rho=1.5)


def test_apgd_checkpoint_schedule():
    from certlab.attacks.apgd import checkpoints

    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (Croce & Hein 2020, Sec. 3.2)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == []


@pytest.mark.parametrize("kind", ["linf", "l2", "segments", "box"])
def test_attack_never_beats_sound_lower_bound(kind):
    """Cross-check with the bound engine: attacked margins ≥ CROWN lower bounds (else a bug in one of them)."""
    import certlab

    torch.manual_seed(11)
    model = _mlp(6, 4, h=16)
    x = torch.rand(10, 6)
    y = model(x).argmax(1).detach()
    threat = {"linf": LinfBall(torch.linspace(0.0, 0.2, 10)), "l2": L2Ball(0.3),
              "segments": SegmentUnion(torch.randn(3, 6), 0.5, domain=(0.0, 1.0)),
              "box": certlab.Box(x - 0.2 * torch.rand(10, 6), x + 0.1 * torch.rand(10, 6))}[kind]
    lb = certlab.margins(model, x, y, threat, method="crown")  # [B, K], column y = 0
    lb = lb.scatter(1, y.view(-1, 1), float("inf")).min(1).values
    err = A.robust_error(model, x, y, threat, attacks=("apgd-ce", "apgd-t"), steps=30)
    xa = A.run(model, x, y, threat, method="apgd-ce", steps=30)
    assert (_margin(model, xa, y) >= lb - 1e-5).all()
    assert not (err & (lb > 0)).any()  # no attack succeeds where robustness is certified


def test_robust_error_routes_options_to_the_attacks_that_take_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).eval()
    x = torch.rand(6, 4)
    y = model(x).argmax(1)
    th = certlab.LinfBall(0.05)
    err = certlab.attacks.robust_error(model, x, y, th, attacks=("apgd-ce", "apgd-t"), steps=5, n_targets=2)
    assert err.shape == (6,)
    with pytest.raises(certlab.InputError, match="unknown option"):
        certlab.attacks.robust_error(model, x, y, th, attacks=("apgd-ce",), n_targets=2)


def test_input_gradient_kernel_policies_change_nothing_but_the_kernel():
    """The kernel policies of attacks.kernels pick between CPU kernels only: same gradient, the oneDNN flag as the
    policy says while each convolution's backward runs, and the flag restored afterwards."""
    from certlab.attacks import base, kernels

    seen = []

    class Probe(torch.autograd.Function):  # records the flag during the backward of the convolution after it
        @staticmethod
        def forward(ctx, t, tag):
            ctx.tag = tag
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            seen.append((ctx.tag, torch.backends.mkldnn.enabled))
            return g, None

    class ProbedConv(torch.nn.Conv2d):
        def forward(self, t):
            return super().forward(Probe.apply(t, self.in_channels))

    torch.manual_seed(0)
    net = torch.nn.Sequential(ProbedConv(1, 4, 4, 2, 1), torch.nn.ReLU(), ProbedConv(4, 6, 3, 1, 1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(6 * 7 * 7, 3))
    x = torch.rand(5, 1, 14, 14)
    y = torch.tensor([0, 1, 2, 0, 1])
    before = torch.backends.mkldnn.enabled
    key = (tuple(x.shape[1:]), x.dtype)
    grads = {}
    try:
        for policy in kernels.POLICIES:
            kernels._CHOICE[net] = {key: policy}
            seen.clear()
            _, grads[policy], _ = base.loss_and_grad(net, x, lambda z: base.ce_loss(z, y))
            assert torch.backends.mkldnn.enabled == before
            if torch.backends.mkldnn.is_available():
                want = {"on": {4: True, 1: True}, "off": {4: False, 1: False}, "mixed": {4: True, 1: False}}[policy]
                assert dict(seen) == want, (policy, seen)
        kernels._CHOICE.pop(net)
        _, g, _ = base.loss_and_grad(net, x, lambda z: base.ce_loss(z, y))  # timed choice
        assert kernels._CHOICE[net][key] in kernels.POLICIES or not torch.backends.mkldnn.is_available()
    finally:
        kernels._CHOICE.pop(net, None)
    assert torch.backends.mkldnn.enabled == before
    assert grads["on"].abs().sum() > 0
    for policy in ("off", "mixed"):
        torch.testing.assert_close(grads[policy], grads["on"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, grads["on"], rtol=1e-5, atol=1e-7)
    n = len(kernels._CHOICE)  # a timed choice is forgotten with its model (no stale entry for a reused id)
    kernels._CHOICE[net] = {key: "on"}
    assert len(kernels._CHOICE) == n + 1
    del net
    gc.collect()
    assert len(kernels._CHOICE) == n


@pytest.mark.parametrize("method", ["pgd", "apgd-ce", "apgd-t"])
def test_a_passed_deadline_stops_the_attack_with_points_inside_the_set(method):
    """``deadline`` (a time.perf_counter() value): once it has passed, a gradient attack stops after at most one
    step per run and still returns points of the set; on a segment set it is accepted and ignored."""
    import time

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    x = torch.rand(64, 20)
    y = model(x).argmax(1)
    th = LinfBall(0.1)
    t0 = time.perf_counter()
    A.run(model, x, y, th, method, steps=500, seed=0)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    xa = A.run(model, x, y, th, method, steps=500, seed=0, deadline=t0)
    cut = time.perf_counter() - t0
    assert cut < 0.2 * full, (cut, full)
    assert bool(((xa - x).abs() <= 0.1 + 1e-6).all())
    err = A.robust_error(model, x, y, SegmentUnion(torch.eye(20)[:2], 0.1), deadline=time.perf_counter())
    assert err.shape == (64,)
    for bad in ("soon", float("nan"), True):
        with pytest.raises(InputError, match="deadline"):
            A.run(model, x, y, th, method, deadline=bad)
