"""Device-agnostic code on an accelerator: every relaxation, the attacks, complete verification and a training run on
CUDA give what they give on the CPU. Skipped where torch sees no GPU (CI never has one); a session lent a GPU runs
``python3 -m pytest tests/test_device.py``. ``CERTLAB_TEST_DEVICE=cpu`` runs the same checks CPU against CPU, which
checks the tests themselves on a machine without a GPU.
"""

import copy
import os

import pytest
import torch

import certlab
from certlab.attacks.api import robust_error
from certlab.verify.complete import verify_any

from nets import cnn, mlp

DEVICE = os.environ.get("CERTLAB_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no GPU (set CERTLAB_TEST_DEVICE=cpu to run on the CPU)")


def _threats(x, k=3):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(k, *x.shape[1:], generator=g).to(x.device)
    return {"linf": certlab.LinfBall(0.05), "l2": certlab.L2Ball(0.2), "segments": certlab.SegmentUnion(d, 0.1)}


@pytest.mark.parametrize("method", certlab.METHODS)
def test_bounds_on_the_device_equal_the_cpus(method):
    model = cnn(3, bn=True, residual=True, normalize=True, pool=True)
    dev = copy.deepcopy(model).to(DEVICE)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    for name, th in _threats(x).items():
        th_d = _threats(x.to(DEVICE))[name]
        cpu = certlab.bounds(model, x, th, method=method)
        gpu = certlab.bounds(dev, x.to(DEVICE), th_d, method=method)
        assert gpu.lower.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(gpu.lower.cpu(), cpu.lower, rtol=1e-4, atol=1e-4, msg=f"{method} {name}")
        torch.testing.assert_close(gpu.upper.cpu(), cpu.upper, rtol=1e-4, atol=1e-4, msg=f"{method} {name}")
        m = certlab.margins(dev, x.to(DEVICE), y.to(DEVICE), th_d, method=method)
        torch.testing.assert_close(m.cpu(), certlab.margins(model, x, y, th, method=method), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_gradients_of_bounds_on_the_device(method):
    model = mlp(2, widths=(5, 8, 8, 3), bn=True).train().to(DEVICE)
    x = torch.rand(6, 5, device=DEVICE)
    y = torch.randint(0, 3, (6,), device=DEVICE)
    loss = torch.nn.functional.cross_entropy(-certlab.margins(model, x, y, certlab.LinfBall(0.05), method=method), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_attacks_and_complete_verification_on_the_device():
    model = mlp(5, widths=(4, 10, 10, 3))
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    th = certlab.LinfBall(0.15)
    dev_model, xd, yd = copy.deepcopy(model).to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    for attack in ("pgd", "apgd-ce", "apgd-t"):
        err, adv = robust_error(dev_model, xd, yd, th, attacks=(attack,), return_adv=True)
        assert err.device.type == torch.device(DEVICE).type
        assert bool(th.contains(adv, xd).all())
        assert torch.equal(dev_model(adv).argmax(1) != yd, err)  # what it reports is what the model does
    for method in ("bab", "crown"):
        gpu = [r.status for r in verify_any(dev_model, xd, yd, th, method, timeout=20)]
        cpu = [r.status for r in verify_any(model, x, y, th, method, timeout=20)]
        assert gpu == cpu, method


def test_training_run_on_the_device(tmp_path):
    from certlab.train import TrainConfig, load_run, train

    cfg = TrainConfig(dataset="spheres", data={"d": 5, "n": 200}, model="mlp", model_params={"hidden": [16, 16]},
                      objective="certified", relaxation="crown-ibp", eps=0.05, epochs=2, batch_size=50,
                      eval_certify=["ibp", "crown"], eval_attacks=["apgd-ce"], eval_n=50, device=DEVICE)
    summary = train(cfg, tmp_path / "run", progress=False)
    ev = summary["eval"]
    assert ev["clean_error"] <= ev["robust_error"] <= min(ev["certified_error"].values())
    model, _ = load_run(tmp_path / "run")
    assert next(model.parameters()).device.type == "cpu"  # checkpoints load on the CPU by default



def _tf32_on():
    """Turn TF32 on for cuDNN convolutions and cuBLAS matmuls; returns the switches' old values to restore."""
    b = torch.backends
    if hasattr(b.cudnn, "conv") and hasattr(b.cudnn.conv, "fp32_precision"):
        saved = [(b.cudnn.conv, "fp32_precision"), (b.cuda.matmul, "fp32_precision")]
        new = "tf32"
    else:
        saved = [(b.cudnn, "allow_tf32"), (b.cuda.matmul, "allow_tf32")]
        new = True
    saved = [(o, a, getattr(o, a)) for o, a in saved]
    for o, a, _ in saved:
        setattr(o, a, new)
    return saved


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_margins_on_the_device_are_within_the_float32_rounding_line_with_tf32_on(method):
    """TF32 keeps 10 mantissa bits (torch uses it for cuDNN convolutions by default on NVIDIA GPUs). Bounds must
    not: their error from the float64 margins stays under the line that decides which certificates are rechecked in
    float64 (certlab.bounds.rounding: REL·(1 + M)). Every weight is 1 + 0.75·2⁻¹⁰ (times a power of two), which TF32
    rounds up by 2.4e-4 relative, every time: the errors add up instead of cancelling, and the control shows that
    a TF32 forward pass of this network crosses the line."""
    from torch import nn

    from certlab.bounds import rounding

    saved = _tf32_on() if DEVICE == "cuda" else []
    try:
        w = 1 + 0.75 * 2 ** -10
        model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 3))
        with torch.no_grad():
            model[0].weight.fill_(w / 256)
            model[0].bias.zero_()
            model[3].weight.zero_()
            model[3].weight[0].fill_(w / 4096)  # f_0 is a positive sum, f_1 = f_2 = 0
            model[3].bias.zero_()
        x = 0.5 + 0.5 * torch.rand(8, 16, 8, 8, generator=torch.Generator().manual_seed(3))
        y = torch.zeros(8, dtype=torch.long)
        th = certlab.LinfBall(0.01)
        m64 = certlab.margins(copy.deepcopy(model).double(), x.double(), y, th, method=method)
        line = rounding.tolerances(copy.deepcopy(model).double(), x.double(), y, th)
        dev = copy.deepcopy(model).to(DEVICE)
        m = certlab.margins(dev, x.to(DEVICE), y.to(DEVICE), th, method=method).cpu().double()
        err = (m - m64).abs()[:, 1:]
        assert (err <= line[:, 1:]).all(), f"{method}: margins off by up to {(err / line[:, 1:]).max():.1f}× the line"
        with torch.no_grad():  # control: the network's forward pass under the same settings
            f = dev(x.to(DEVICE)).cpu().double()
            f64 = model.double()(x.double())
        crossed = ((f - f64)[:, 0].abs() > line[:, 1]).all()
        if DEVICE == "cuda" and not crossed:
            pytest.skip("this GPU's forward pass shows no TF32 error: nothing to compare against")
    finally:
        for o, a, old in saved:
            setattr(o, a, old)


def test_milp_and_lp_take_a_model_on_the_device():
    """MILP and LP solve on the CPU: a model and batch on the device give the CPU's answers, the caller's model stays
    where it was, and bounds and counterexamples come back on the device (ℓ2 runs the float64 evaluator too)."""
    from certlab.verify import lp, milp
    from certlab.verify.complete import verify_complete

    model = mlp(5, widths=(4, 8, 8, 3))
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    y[2:] = (y[2:] + 1) % 3  # wrong labels: MILP falsifies them, with a counterexample
    dev_model, xd, yd = copy.deepcopy(model).to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    for th in (certlab.LinfBall(0.1), certlab.L2Ball(0.2)):
        for method in ("milp", "lp"):
            gpu = verify_complete(dev_model, xd, yd, th, method, timeout=20)
            cpu = verify_complete(model, x, y, th, method, timeout=20)
            assert [r.status for r in gpu] == [r.status for r in cpu], (method, th.norm)
            if method == "milp":
                assert [r.status for r in gpu][2:] == ["falsified", "falsified"]
            for r in gpu:
                if r.counterexample is not None:
                    assert r.counterexample.device.type == torch.device(DEVICE).type
        lo, hi = milp.exact_bounds(dev_model, xd, th)
        assert lo.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(lo.cpu(), milp.exact_bounds(model, x, th)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp.lp_margins(dev_model, xd, yd, th).cpu(), lp.lp_margins(model, x, y, th),
                                   rtol=1e-5, atol=1e-5)
    assert next(dev_model.parameters()).device.type == torch.device(DEVICE).type
