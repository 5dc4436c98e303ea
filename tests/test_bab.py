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
