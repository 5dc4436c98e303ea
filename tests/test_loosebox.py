"""Loose parametrised Box (box-c:ω, box-dc:ω:F): the widening as specified, sound, box-c:0 = IBP, box-dc
discontinuous in the weights and box-c not, names and configuration errors."""

import pytest
import torch

import certlab
from certlab.bounds import loosebox, relu_bounds, resolve_method
from certlab.errors import CertlabError, InputError
from certlab.verify import diagnostics
from nets import cnn, mlp, pgd_extremes, threat_for

NAMES = ("box-c:0.3", "box-dc:0.3:10", "box-dc:1:1")


def _data(model_kind, seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    if model_kind == "mlp":
        return mlp(seed, (4, 12, 12, 3)), torch.rand(n, 4, generator=g)
    return cnn(seed), torch.rand(n, 1, 6, 6, generator=g)


def test_names_resolve_and_bad_parameters_are_one_line_errors():
    assert resolve_method("Box-C:0.50") == "box-c:0.5"
    assert resolve_method("box-dc:2:100") == "box-dc:2:100"
    for bad in ("box-c", "box-c:-1", "box-c:inf", "box-c:1:2", "box-dc:1", "box-dc:1:0", "box-dc:x:1", "box-dc:1:-2"):
        with pytest.raises(InputError) as e:
            resolve_method(bad)
        assert "\n" not in str(e.value) and bad in str(e.value)
    from certlab.train import TrainConfig

    assert TrainConfig(relaxation="box-dc:0.5:10").relaxation == "box-dc:0.5:10"
    with pytest.raises(CertlabError, match="F must be a finite number > 0"):
        TrainConfig(relaxation="box-dc:0.5:0")
    with pytest.raises(CertlabError, match="unknown relaxation"):
        TrainConfig(relaxation="box-x:1")


def test_widening_as_specified():
    l, u = torch.tensor([-1.23, 0.41, 2.0]), torch.tensor([0.37, 0.9, 2.0])
    wl, wu = loosebox.widen(l, u, "c", 0.5)
    assert torch.allclose(wl, l - 0.5) and torch.allclose(wu, u + 0.5)
    wl, wu = loosebox.widen(l, u, "dc", 0.5, 10.0)  # 10·l = −12.3 → ⌈⌉ = −12; 10·u = 3.7 → ⌊⌋ = 3
    assert wl[0] == pytest.approx(-1.23 - 0.5 * 0.3) and wu[0] == pytest.approx(0.37 + 0.5 * 0.7)
    assert wl[2] == pytest.approx(2.0) and wu[2] == pytest.approx(2.0)  # F·l integer: no widening
    assert ((l - wl) < 0.5).all() and ((wu - u) < 0.5).all()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_box_c_zero_is_ibp_and_widening_is_nested(kind, norm):
    model, x = _data(kind)
    th = threat_for(norm, x, 0.1)
    ibp = certlab.bounds(model, x, th, "ibp")
    b0 = certlab.bounds(model, x, th, "box-c:0")
    assert torch.equal(ibp.lower, b0.lower) and torch.equal(ibp.upper, b0.upper)
    dc, c = certlab.bounds(model, x, th, "box-dc:0.2:10"), certlab.bounds(model, x, th, "box-c:0.2")
    assert (c.lower <= dc.lower + 1e-5).all() and (dc.lower <= ibp.lower + 1e-5).all()
    assert (c.upper >= dc.upper - 1e-5).all() and (dc.upper >= ibp.upper - 1e-5).all()
    # every ReLU input interval is IBP's widened: exactly by ω at the first ReLU
    (l0, u0), (lc, uc) = relu_bounds(model, x, th, "ibp")[0], relu_bounds(model, x, th, "box-c:0.2")[0]
    assert torch.allclose(lc, l0 - 0.2, atol=1e-6) and torch.allclose(uc, u0 + 0.2, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_sound_against_sampled_and_attacked_points(kind, norm):
    model, x = _data(kind, seed=3)
    th = threat_for(norm, x, 0.15)
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([th.sample(x, 64, generator=g), pgd_extremes(model, x, th, steps=15, restarts=1)])
    with torch.no_grad():
        out = torch.stack([model(p) for p in pts])  # [P, B, K]
    y = model(x).argmax(1)
    for name in NAMES:
        b = certlab.bounds(model, x, th, name)
        assert (out >= b.lower - 1e-5).all() and (out <= b.upper + 1e-5).all(), name
        m = certlab.margins(model, x, y, th, name)
        true = out.gather(2, y[None, :, None].expand(out.shape[0], -1, 1)) - out
        assert (true.amin(0) >= m - 1e-5).all(), name


def test_box_dc_is_discontinuous_in_the_weights_and_box_c_is_not():
    model, x = _data("mlp", seed=5, n=8)
    y = model(x).argmax(1)
    th = certlab.LinfBall(0.1)
    kw = dict(grid=7, radius=0.05, refine=30)
    jc = diagnostics.loss_jump(model, x, y, th, "box-c:0.5", **kw)
    jdc = diagnostics.loss_jump(model, x, y, th, "box-dc:0.5:100", **kw)
    assert jc < 1e-7 and jdc > 1e-4
    pc, pdc = diagnostics.transformer_properties("box-c:0.5"), diagnostics.transformer_properties("box-dc:0.5:100")
    assert pc["continuous"] and not pdc["continuous"] and pdc["relu_jump"] == pytest.approx(0.5, rel=0.05)
    assert not pc["sensitive"] and not pdc["sensitive"]  # both piecewise linear, like IBP


def test_trains_and_certifies_from_config_and_cli(tmp_path, capsys):
    from certlab.cli import main
    from certlab.train import TrainConfig, train

    cfg = TrainConfig(dataset="spheres", data={"d": 4, "n": 200}, model="mlp", model_params={"hidden": [12]},
                      objective="certified", relaxation="box-dc:0.05:10", epochs=1, lr=0.01, eps=0.05,
                      batch_size=50, eval_n=20, eval_attacks=[], eval_certify=["ibp", "box-c:0.05"], eval_acr=False)
    run = tmp_path / "run"
    summary = train(cfg, run, progress=False)
    ce = summary["eval"]["certified_error"]
    assert ce["box-c:0.05"] >= ce["ibp"]  # looser: never certifies more
    assert main(["certify", str(run), "--method", "box-dc:0.05:10", "--n", "5", "--no-progress",
                 "--out", str(tmp_path / "r.jsonl")]) == 0
    assert main(["certify", str(run), "--method", "box-dc:0.05:-1", "--n", "5"]) == 2
    assert "F must be a finite number > 0" in capsys.readouterr().err
