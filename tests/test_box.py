"""certlab.Box: per-feature bounds, one box per sample, through bounds, attacks, complete verification and training."""

import pytest
import torch

import certlab
from certlab.errors import InputError
from nets import cnn, mlp


def _box(x, seed=0, w=0.1):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((2, *x.shape), generator=g)
    return certlab.Box(x - w * u[0], x + w * u[1])


def test_bad_boxes_are_one_line_errors():
    x = torch.rand(2, 3)
    for lo, hi, what in ((x + 0.1, x, "lower > upper"), (x.clone().fill_(float("nan")), x, "NaN"),
                         (x[:, :2], x, "same shape")):
        with pytest.raises(InputError, match=what) as e:
            certlab.Box(lo, hi)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="outside its Box"):
        certlab.bounds(mlp(0, (3, 4, 2)), x + 1, certlab.Box(x, x + 0.1), method="crown")
    with pytest.raises(InputError, match="no radius"):
        certlab.Box(x, x).with_eps(0.1)


def test_box_equals_linf_ball_when_symmetric():
    """A symmetric box is the ℓ∞ ball: every relaxation gives the same bounds."""
    model = cnn(1)
    x = torch.rand(2, 1, 6, 6) * 0.8 + 0.1
    ball, box = certlab.LinfBall(0.05), certlab.Box(x - 0.05, x + 0.05)
    for m in certlab.METHODS:
        a, b = certlab.bounds(model, x, ball, method=m), certlab.bounds(model, x, box, method=m)
        assert torch.allclose(a.lower, b.lower, atol=1e-5) and torch.allclose(a.upper, b.upper, atol=1e-5), m


def test_flat_box_gives_the_point():
    model = mlp(2, (4, 8, 3))
    x = torch.rand(3, 4)
    for m in certlab.METHODS:
        b = certlab.bounds(model, x, certlab.Box(x, x), method=m)
        with torch.no_grad():
            out = model(x)
        assert torch.allclose(b.lower, out, atol=1e-5) and torch.allclose(b.upper, out, atol=1e-5), m


def test_attacks_stay_in_the_box_and_find_what_bounds_allow():
    model = mlp(3, (4, 16, 3))
    x = torch.rand(6, 4)
    y = model(x).argmax(1)
    box = _box(x, 1, w=0.5)
    for method in ("pgd", "apgd-ce", "apgd-t"):
        xa = certlab.attacks.run(model, x, y, box, method=method, steps=20)
        assert box.contains(xa, x, tol=1e-6).all()
        hit = certlab.attacks.attack_success(model, xa, y)
        assert not (hit & certlab.certify(model, x, y, box, "crown")).any()


def test_verify_complete_on_a_box_agrees_with_milp_and_bab():
    model = mlp(4, (2, 12, 12, 3))
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(4))
    y = model(x).argmax(1)
    box = _box(x, 2, w=0.3)
    res = {m: certlab.verify_complete(model, x, y, box, method=m, timeout=20) for m in ("milp", "bab")}
    assert [r.status for r in res["milp"]] == [r.status for r in res["bab"]]
    for r, b in zip(res["milp"], range(6)):
        assert r.status in ("verified", "falsified")
        if r.status == "falsified":
            z = r.counterexample.unsqueeze(0)
            assert box.subset(x, torch.tensor([b])).contains(z, x[b:b + 1], tol=1e-6).all()
            assert int(model(z).argmax(1)) != int(y[b])


def test_box_in_training_objectives():
    """A Box of the whole data set is sliced to each batch; the certified and adversarial losses are finite."""
    from certlab.train.threats import batch_threat

    model = mlp(5, (4, 8, 3))
    x_all = torch.rand(10, 4)
    box = _box(x_all, 3)
    idx = torch.arange(2, 6)
    th = batch_threat(box, x_all[idx], idx)
    assert torch.equal(th.lower, box.lower[idx])
    for m in ("ibp", "crown-ibp", "crown"):
        lo = certlab.bounds(model, x_all[idx], th, method=m).lower
        lo.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()



@pytest.mark.parametrize("objective", ["pgd", "trades", "certified"])
def test_training_objectives_take_a_box(objective):
    from types import SimpleNamespace

    from certlab.train.config import TrainConfig
    from certlab.train.objectives import OBJECTIVES

    model = mlp(6, (4, 8, 3)).train()
    x = torch.rand(5, 4)
    y = torch.randint(0, 3, (5,))
    box = _box(x, 4)
    cfg = TrainConfig(objective=objective, relaxation="crown-ibp", attack_steps=3)
    ctx = SimpleNamespace(cfg=cfg, eps=0.1, beta=0.5, kappa=0.5, seed=0, t=1.0, threat=lambda xb: box)
    loss, stats = OBJECTIVES[objective](model, x, y, ctx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_float64_box_is_rounded_outwards_for_float32_inputs():
    lo64 = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    hi64 = lo64 + 1e-3
    box = certlab.Box(lo64, hi64)
    lo, hi = box.interval_hull(lo64.float() + 5e-4)
    assert (lo.double() <= lo64).all() and (hi.double() >= hi64).all()
