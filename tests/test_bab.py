"""Branch and bound agrees with the exact MILP; its answers are re-checked against the model."""

import pytest
import torch
from torch import nn

import certlab
from nets import mlp
from certlab.errors import InputError
from certlab.verify import bab, milp


def _net(seed, widths=(2, 20, 20, 3)):
    return mlp(seed, widths)


def _valid(model, x, y, threat, res):
    for b, r in enumerate(res):
        if r.status == "falsified":
            z = r.counterexample.unsqueeze(0)
            assert bool(threat.contains(z, x[b:b + 1], tol=1e-5)[0])
            assert int(model(z).argmax(1)[0]) != int(y[b])
        else:
            assert r.counterexample is None


def _bab_equals_milp(model, x, y, threat):
    """BaB and the exact MILP (20 s each, no attacks) decide every sample alike, BaB's results are valid; returns
    the MILP's results."""
    rb = bab.verify(model, x, y, threat, timeout=20, attack=False)
    rm = milp.verify(model, x, y, threat, timeout=20, attack=False)
    _valid(model, x, y, threat, rb)
    assert [r.status for r in rb] == [r.status for r in rm]
    assert all(r.status != "unknown" for r in rb)
    return rm


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_bab_agrees_with_milp_on_random_mlps(seed):
    torch.manual_seed(0)
    model = _net(seed)
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(seed + 10))
    y = model(x).argmax(1)
    for eps in (0.05, 0.15, 0.3):
        threat = certlab.LinfBall(eps)
        rm = _bab_equals_milp(model, x, y, threat)
        for m in ("ibp", "crown", "alpha-crown"):  # never certify what MILP falsifies
            cert = certlab.certify(model, x, y, threat, m)
            assert not any(bool(c) and r.status == "falsified" for c, r in zip(cert, rm))


def test_bab_needs_branching_and_still_agrees():
    """A case CROWN cannot certify but the MILP proves robust: BaB must split to agree."""
    model = _net(3)
    x = torch.rand(8, 2, generator=torch.Generator().manual_seed(13))[7:8]
    y = model(x).argmax(1)
    threat = certlab.LinfBall(0.3)
    assert not bool(certlab.certify(model, x, y, threat, "crown")[0])
    assert milp.verify(model, x, y, threat, attack=False)[0].status == "verified"
    r = bab.verify(model, x, y, threat, timeout=30, attack=False)[0]
    assert r.status == "verified" and r.nodes > 1
    r = bab.verify(model, x, y, threat, timeout=30, attack=False, leaf_milp=0, max_nodes=3)[0]
    assert r.status == "unknown"  # the node limit stops it short


def test_bab_cnn_residual_and_segments():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = cnn(x).argmax(1)
    th = certlab.LinfBall(0.08)
    rb, rm = bab.verify(cnn, x, y, th, timeout=20), milp.verify(cnn, x, y, th, timeout=20)
    _valid(cnn, x, y, th, rb)
    assert [r.status for r in rb] == [r.status for r in rm]
    body = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    res = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), certlab.nn.Residual(body), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(2))
    y = res(x).argmax(1)
    seg = certlab.SegmentUnion(torch.randn(3, 2, generator=torch.Generator().manual_seed(3)), 0.4, domain=(0, 1))
    for th in (certlab.LinfBall(0.3), seg):
        rb = bab.verify(res, x, y, th, timeout=20, attack=False)
        rm = milp.verify(res, x, y, th, timeout=20, attack=False)
        _valid(res, x, y, th, rb)
        assert [r.status for r in rb] == [r.status for r in rm]


def test_bab_l2_is_sound_and_bad_input_raises():
    model = _net(1, (2, 12, 12, 3))
    x = torch.rand(5, 2, generator=torch.Generator().manual_seed(4))
    y = model(x).argmax(1)
    th = certlab.L2Ball(0.2)
    rb = bab.verify(model, x, y, th, timeout=10)
    rm = milp.verify(model, x, y, th, timeout=10)
    _valid(model, x, y, th, rb)
    for a, b in zip(rb, rm):
        assert {a.status, b.status} != {"verified", "falsified"}
    with pytest.raises(InputError):
        bab.verify(model, x, y, th, timeout=0)
    with pytest.raises(InputError):
        bab.verify(model, x, y[:1], th)


def test_root_alpha_intermediate_bounds_are_sound_and_tighter():
    """α-CROWN's optimised intermediate bounds (root_iters) contain every reachable pre-activation and are never
    looser than CROWN's."""
    from certlab.bounds import backsub

    model = _net(2, (4, 24, 24, 24, 3)).double()
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    y = model(x).argmax(1)
    threat = certlab.LinfBall(0.25)
    S = bab._Search(model, x, y, threat, 8)
    with torch.no_grad():
        pre = backsub.intermediate(S.g, x, threat, lower="adaptive")
    crown = {r: (l.clone(), u.clone()) for r, (l, u) in pre.items()}
    S.optimise_intermediate(pre, 30)
    pts = x + 0.25 * (2 * torch.rand(4000, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64) - 1)
    pts = pts.clamp(0, 1)  # LinfBall's domain
    acts, h = [], pts
    for m in model:  # pre-activations of every ReLU at the sampled points
        if isinstance(m, nn.ReLU):
            acts.append(h)
        h = m(h)
    gained = 0.0
    for r, z in zip(S.relus, acts):
        l, u = pre[r]
        assert bool((z >= l - 1e-9).all()) and bool((z <= u + 1e-9).all())
        assert bool((l >= crown[r][0] - 1e-12).all()) and bool((u <= crown[r][1] + 1e-12).all())
        gained += float((l - crown[r][0]).sum() + (crown[r][1] - u).sum())
    assert gained > 0  # the optimisation tightens something on this network


@pytest.mark.parametrize("seed", [4, 5])
def test_bab_agrees_with_milp_on_deeper_nets_with_several_margins(seed):
    """Three hidden layers and four classes: root α-CROWN intermediate bounds and per-domain open margins (three
    rows each) must leave BaB's answers exactly the MILP's."""
    model = _net(seed, (3, 16, 16, 16, 4))
    x = torch.rand(6, 3, generator=torch.Generator().manual_seed(seed + 20))
    y = model(x).argmax(1)
    for eps in (0.1, 0.25):
        _bab_equals_milp(model, x, y, certlab.LinfBall(eps))


@pytest.mark.parametrize("widths", [(3, 16, 16, 4), (3, 12, 12, 12, 4)])
def test_float64_bab_agrees_with_milp(widths):
    """In float64 (as `certlab verify` runs it): per-margin searches, children warm-started from their parent's α
    (and β on two-ReLU-layer nets), the second-layer bound update and the float64 rounding line still decide every
    sample exactly as the MILP."""
    model = _net(6, widths).double()
    x = torch.rand(6, 3, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    y = model(x).argmax(1)
    for eps in (0.1, 0.2):
        _bab_equals_milp(model, x, y, certlab.LinfBall(eps))


def test_float32_steps_only_choose_and_a_wrong_copy_cannot_prove(monkeypatch):
    """The α/β steps on a float32 copy of the network only choose α and β; the bound that proves is float64 on the
    network itself. With the copy replaced by a different network (so the steps optimise the wrong function) no
    answer may differ from the MILP's except by staying undecided."""
    model = _net(4, (3, 12, 12, 12, 4)).double()
    x = torch.rand(8, 3, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    y = model(x).argmax(1)
    threat = certlab.LinfBall(0.2)
    S = bab._Search(model, x[:1], y[:1], threat, 8)
    assert S.g32 is not None and S.A32.dtype == torch.float32  # the steps do run in float32 here
    wrong = _net(99, (3, 12, 12, 12, 4))
    init = bab._Search.__init__

    def swapped(self, model_, x_, *a, **k):
        init(self, model_, x_, *a, **k)
        if self.g32 is not None:
            other = bab._Search.__new__(bab._Search)
            init(other, wrong.double(), x_, *a, **k)
            self.g32, self.A32, self.c32 = other.g32, other.A32, other.c32

    monkeypatch.setattr(bab._Search, "__init__", swapped)
    rb = bab.verify(model, x, y, threat, timeout=10, attack=False)
    rm = milp.verify(model, x, y, threat, timeout=20, attack=False)
    _valid(model, x, y, threat, rb)
    assert all(b.status in (m.status, "unknown") for b, m in zip(rb, rm))
    assert {m.status for m in rm} == {"verified", "falsified"}  # both answers are at stake
    crown = certlab.certify(model, x, y, threat, "crown")
    assert any(m.status == "verified" and not bool(c) for m, c in zip(rm, crown))  # and some need the search


def _subdomain_points(model, x, eps, splits, n=20000, seed=0):
    """Points of the ℓ∞ ball (clipped to [0, 1]) that satisfy the sign splits {(layer, neuron): ±1}, and the
    pre-activations of every ReLU there."""
    pts = (x + eps * (2 * torch.rand(n, x.shape[1], generator=torch.Generator().manual_seed(seed),
                                     dtype=torch.float64) - 1)).clamp(0, 1)
    acts, h = [], pts
    for m in model:
        if isinstance(m, nn.ReLU):
            acts.append(h)
        h = m(h)
    keep = torch.ones(n, dtype=torch.bool)
    for (layer, k), sg in splits.items():
        keep &= (acts[layer][:, k] >= 0) if sg > 0 else (acts[layer][:, k] <= 0)
    return [a[keep] for a in acts], h[keep]


def test_second_layer_update_is_the_back_substitution_and_sound():
    """The second-layer bounds computed as the root's plus a correction for the split first-layer neurons equal the
    full back-substitution, and contain the pre-activations of sampled points of the subdomain."""
    from certlab.bounds import backsub

    model = _net(7, (4, 24, 24, 3)).double()
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y, eps = model(x).argmax(1), 0.2
    threat = certlab.LinfBall(eps)
    S = bab._Search(model, x, y, threat, 8)
    with torch.no_grad():
        S.root_pre = pre0 = backsub.intermediate(S.g, x, threat, lower="adaptive")
        r1, r2 = S.relus
        assert S._second(1) is not None
        l, u = (v.reshape(1, -1) for v in pre0[r1])
        cross = ((l < 0) & (u > 0))[0].nonzero().flatten().tolist()
        assert len(cross) >= 6
        doms = [{(0, k): (1 if j % 2 else -1) for j, k in enumerate(cross[i:i + 3])} for i in range(0, 6, 2)]
        L, U = l.repeat(len(doms), 1), u.repeat(len(doms), 1)
        for i, d in enumerate(doms):
            for (_, k), sg in d.items():
                if sg > 0:
                    L[i, k] = L[i, k].clamp_min(0)
                else:
                    U[i, k] = U[i, k].clamp_max(0)
        pre, X = {r1: (L, U)}, x.expand(len(doms), -1)
        p2, cols = S.g.nodes[r2].inputs[0], torch.arange(24)
        fast = S._node_bounds(p2, cols, pre, X, 1)
        S.fast_second = False
        full = S._node_bounds(p2, cols, pre, X, 1)
    for a, b in zip(fast, full):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    for i, d in enumerate(doms):
        acts, _ = _subdomain_points(model, x, eps, d, seed=i)
        assert acts[1].shape[0] > 0
        assert bool((acts[1] >= fast[0][i] - 1e-9).all()) and bool((acts[1] <= fast[1][i] + 1e-9).all())


@pytest.mark.parametrize("widths", [(4, 20, 20, 3), (4, 16, 16, 16, 3)])
def test_warm_started_bounds_are_sound(widths):
    """Margin bounds from any starting α ∈ [0, 1] and β ≥ 0 (as a parent hands them down), after the α/β steps and
    the β rounding charge, lie below the margins of sampled points of the subdomain."""
    from certlab.bounds import backsub

    model = _net(8, widths).double()
    x = torch.rand(1, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    y, eps = model(x).argmax(1), 0.15
    threat = certlab.LinfBall(eps)
    S = bab._Search(model, x, y, threat, 8, iters=10)
    S.beta_mag = bab._input_magnitudes(S.g, x, threat)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        S.root_pre = pre0 = backsub.intermediate(S.g, x, threat, lower="adaptive")
        lo = [pre0[r][0].reshape(1, -1) for r in S.relus]
        hi = [pre0[r][1].reshape(1, -1) for r in S.relus]
        doms = []
        for i in range(4):  # two splits per domain, in the first and the last ReLU layer
            d = {}
            for layer in (0, len(S.relus) - 1):
                cross = ((lo[layer] < 0) & (hi[layer] > 0))[0].nonzero().flatten()
                d[(layer, int(cross[(3 * i + layer) % cross.numel()]))] = 1 if (i + layer) % 2 else -1
            doms.append(d)
        N, Srows = len(doms), S.A.shape[0]
        split = [torch.zeros(N, v.shape[1], dtype=torch.int8) for v in lo]
        for i, d in enumerate(doms):
            for (layer, k), sg in d.items():
                split[layer][i, k] = sg
        init = ({p: torch.rand(N, Srows, v.shape[1], generator=g, dtype=torch.float64) for p, v in enumerate(lo)},
                {p: 2 * torch.rand(N, Srows, v.shape[1], generator=g, dtype=torch.float64) for p, v in enumerate(lo)})
        ev = S.evaluate([v.repeat(N, 1) for v in lo], [v.repeat(N, 1) for v in hi], split, -1, None, init)
    low = ev[2]
    C = certlab.bounds.core.margin_spec(y, 3, torch.float64)[0][S.rows]
    checked = 0
    for i, d in enumerate(doms):
        _, out = _subdomain_points(model, x, eps, d, seed=20 + i)
        if out.shape[0]:
            checked += 1
            assert bool(((out @ C.T).min(0).values >= low[i] - 1e-9).all())
    assert checked >= 2
