"""Complete verification by MILP: answers are checked against the model, attacks, sampling and the relaxations."""

import pytest
import torch

import certlab
from nets import mlp
from certlab.errors import InputError
from certlab.verify import milp


def _net(seed, widths=(2, 20, 20, 3)):
    return mlp(seed, widths)


def _check(model, x, y, threat, results):
    """Falsified: the counterexample is in the set and misclassified. Verified: no sampled point is misclassified."""
    assert len(results) == x.shape[0]
    pts = threat.sample(x, 3000)
    with torch.no_grad():
        wrong = (model(pts.reshape(-1, *x.shape[1:])).reshape(3000, x.shape[0], -1).argmax(-1) != y).any(0)
    for b, r in enumerate(results):
        assert r.status in ("verified", "falsified", "unknown")
        if r.status == "falsified":
            z = r.counterexample.unsqueeze(0)
            assert bool(threat.contains(z, x[b:b + 1])[0]) if not isinstance(threat.eps, torch.Tensor) else True
            assert int(model(z).argmax(1)[0]) != int(y[b])
        else:
            assert r.counterexample is None
        if r.status == "verified":
            assert not bool(wrong[b])


@pytest.mark.parametrize("eps", [0.03, 0.1, 0.3])
def test_milp_linf_answers_are_checked(eps):
    torch.manual_seed(0)
    model = _net(0)
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    threat = certlab.LinfBall(eps)
    res = milp.verify(model, x, y, threat, timeout=20)
    _check(model, x, y, threat, res)
    assert all(r.status != "unknown" for r in res)  # tiny nets are solved to the end
    for m in ("ibp", "crown", "alpha-crown"):  # a relaxation never certifies what the MILP falsifies
        cert = certlab.certify(model, x, y, threat, m)
        for b, r in enumerate(res):
            if cert[b]:
                assert r.status == "verified", f"{m} certifies sample {b} but the MILP says {r.status}"


def test_milp_finds_what_attacks_miss_and_proves_what_crown_cannot():
    """Without the attack, counterexamples come from the MILP itself; some sample is verified only by MILP."""
    torch.manual_seed(0)
    model = _net(3)
    x = torch.rand(12, 2, generator=torch.Generator().manual_seed(4))
    y = model(x).argmax(1)
    threat = certlab.LinfBall(0.12)
    res = milp.verify(model, x, y, threat, timeout=20, attack=False)
    _check(model, x, y, threat, res)
    st = [r.status for r in res]
    assert "falsified" in st and "verified" in st
    crown = certlab.certify(model, x, y, threat, "crown")
    assert sum(s == "verified" for s in st) >= int(crown.sum())


def test_milp_wrong_label_is_falsified_at_the_centre():
    model = _net(0)
    x = torch.rand(2, 2, generator=torch.Generator().manual_seed(1))
    y = (model(x).argmax(1) + 1) % 3
    res = milp.verify(model, x, y, certlab.LinfBall(0.0), timeout=5)
    assert [r.status for r in res] == ["falsified", "falsified"]
    assert torch.allclose(res[0].counterexample, x[0])


def test_milp_segments_and_l2_are_sound():
    torch.manual_seed(0)
    model = _net(5, (2, 12, 12, 3))
    x = torch.rand(4, 2, generator=torch.Generator().manual_seed(6)) * 0.6 + 0.2
    y = model(x).argmax(1)
    seg = certlab.SegmentUnion(torch.randn(3, 2, generator=torch.Generator().manual_seed(7)), 0.2, domain=(0, 1))
    res = milp.verify(model, x, y, seg, timeout=20, attack=False)
    _check(model, x, y, seg, res)
    assert all(r.status != "unknown" for r in res)
    l2 = certlab.L2Ball(0.15)
    res = milp.verify(model, x, y, l2, timeout=20)
    _check(model, x, y, l2, res)
    crown = certlab.certify(model, x, y, l2, "crown")
    for b, r in enumerate(res):
        assert not (crown[b] and r.status != "verified")


def test_milp_per_sample_eps_and_bad_input():
    model = _net(0)
    x = torch.rand(3, 2, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    eps = torch.tensor([0.0, 0.05, 0.5])
    res = milp.verify(model, x, y, certlab.LinfBall(eps), timeout=10)
    assert res[0].status == "verified" and res[2].status == "falsified"
    assert (res[2].counterexample - x[2]).abs().max() <= 0.5 + 1e-6
    with pytest.raises(InputError):
        milp.verify(model, x, y, "linf")
    with pytest.raises(InputError):
        milp.verify(model, x, y[:2], certlab.LinfBall(0.1))
    with pytest.raises(InputError):
        milp.exact_bounds(model, x, certlab.LinfBall(0.1), pre="deepz")


def test_exact_bounds_match_attained_values():
    """The MILP optimum is attained: the solver's point, run through the model, gives the same value."""
    model = _net(8, (3, 8, 8, 2))
    x = torch.rand(2, 3, generator=torch.Generator().manual_seed(9))
    threat = certlab.LinfBall(0.2)
    lo, hi = milp.exact_bounds(model, x, threat)
    with torch.no_grad():
        v = threat.vertices(x, 4000)
        out = model(v.reshape(-1, 3)).reshape(4000, 2, 2)
    # a box vertex need not be optimal, but min over many samples must stay above the exact minimum
    assert (out.min(0).values >= lo - 1e-5).all() and (out.max(0).values <= hi + 1e-5).all()
    crown = certlab.bounds(model, x, threat, "crown")
    assert (crown.lower <= lo + 1e-5).all()
