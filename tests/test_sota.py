"""SABR, TAPS, STAPS, MTL-IBP, EXP-IBP and CC-IBP: limiting cases, gradients, training, and certification of their
models by sound verifiers over the whole ε-set."""

import math

import pytest
import torch
from torch import nn

import certlab
from certlab import data as cdata
from certlab.errors import CertlabError
from certlab.threat import L2Ball, LinfBall, SegmentUnion
from certlab.train import TrainConfig, evaluate_run, load_run, train
from certlab.train import latent
from certlab.train.objectives import OBJECTIVES, StepContext
from certlab.train.threats import ThreatMaker

SOTA = ("sabr", "taps", "staps", "mtl-ibp", "exp-ibp", "cc-ibp")


def _toy(n=96, d=6, seed=0):
    ds = cdata.load("linsep", "train", d=d, n=n, margin=1.0, sigma=1.0, seed=seed)
    return ds.x, ds.y, ds.info


def _net(d, seed=0, width=16, classes=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def _ctx(cfg, info, eps, t=100.0, seed=1):
    maker = ThreatMaker(cfg.norm, info.name, info, cfg.k, cfg.seed)
    return StepContext(cfg, maker, eps, cfg.kappa_start or 0.0, cfg.beta_start, t, seed=seed)


def _cfg(**kw):
    return TrainConfig.from_dict({"dataset": "linsep", "eps": 0.3, "attack_steps": 5, **kw})


def _loss_and_grads(objective, model, x, y, ctx):
    loss, st = OBJECTIVES[objective](model, x, y, ctx)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return loss.detach(), grads, st


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# -- config ---------------------------------------------------------------------------------------------------
def test_config_fields_are_validated():
    cfg = TrainConfig(objective="staps", sabr_lambda=0.3, taps_head=2, taps_grad_scale=5.0, taps_threshold=0.4,
                      taps_ibp_mult=False)
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert TrainConfig.from_yaml("objective: cc-ibp\ncert_alpha: 0.2\n").cert_alpha == 0.2  # as in YAML sweeps
    for bad, msg in [({"sabr_lambda": 0.0}, "sabr_lambda must be > 0"), ({"sabr_lambda": 1.5}, "sabr_lambda must lie"),
                     ({"cert_alpha": -0.1}, "cert_alpha must be >= 0"), ({"cert_alpha": 2}, "cert_alpha must lie"),
                     ({"taps_head": -1}, "taps_head must be >= 0"), ({"taps_head": 1.5}, "taps_head must be an int"),
                     ({"taps_grad_scale": 0}, "taps_grad_scale must be > 0"),
                     ({"taps_threshold": 0}, "taps_threshold must be > 0"),
                     ({"taps_ibp_mult": "yes"}, "taps_ibp_mult must be true or false"),
                     ({"objective": "mtl-ibp", "attack": "fgsm9"}, "unknown attack"),
                     ({"objective": "sabr", "norm": "segments", "k": 2}, "needs k=1 on norm 'segments'"),
                     ({"objective": "staps", "norm": "segments", "k": 3}, "leaves the threat set")]:
        with pytest.raises(CertlabError, match=msg):
            TrainConfig.from_dict(bad)
    TrainConfig(objective="sabr", norm="segments", k=1)  # one segment: the small segment stays on it
    TrainConfig(objective="taps", norm="segments", k=3)  # taps propagates the whole set


def test_train_help_explains_each_objective(capsys):
    from certlab.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in SOTA:
        assert any(line.strip().startswith(name + " ") for line in out.splitlines()), name


# -- limiting cases -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,relaxation", [("linf", "ibp"), ("l2", "crown"), ("linf", "crown-ibp")])
def test_sabr_with_lambda_one_is_certified_training(norm, relaxation):
    x, y, info = _toy()
    model = _net(x.shape[1])
    cert = _cfg(objective="certified", norm=norm, relaxation=relaxation, kappa_start=0.3, beta_start=0.5)
    sabr = cert.replace(objective="sabr", sabr_lambda=1.0)
    l0, g0, _ = _loss_and_grads("certified", model, x, y, _ctx(cert, info, 0.3))
    l1, g1, _ = _loss_and_grads("sabr", model, x, y, _ctx(sabr, info, 0.3))
    _close(l1, l0)
    for a, b in zip(g1, g0):
        _close(a, b)


@pytest.mark.parametrize("objective", ["mtl-ibp", "exp-ibp", "cc-ibp"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_expressive_losses_at_alpha_one_and_zero(objective, norm):
    x, y, info = _toy()
    model = _net(x.shape[1])
    base = _cfg(norm=norm)
    l_cert, g_cert, _ = _loss_and_grads("certified", model, x, y, _ctx(base.replace(objective="certified"), info, 0.3))
    l_adv, g_adv, _ = _loss_and_grads("pgd", model, x, y, _ctx(base.replace(objective="pgd"), info, 0.3))
    l1, g1, _ = _loss_and_grads(objective, model, x, y, _ctx(base.replace(objective=objective, cert_alpha=1.0), info, 0.3))
    l0, g0, _ = _loss_and_grads(objective, model, x, y, _ctx(base.replace(objective=objective, cert_alpha=0.0), info, 0.3))
    _close(l1, l_cert)
    _close(l0, l_adv)
    for a, b, c, d in zip(g1, g_cert, g0, g_adv):
        _close(a, b)
        _close(c, d, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(l_cert, l_adv)  # the two ends differ, so the checks above are not vacuous
    # in between: MTL is the weighted mean, EXP the weighted geometric mean, CC lies between the ends
    lm, _, _ = _loss_and_grads(objective, model, x, y, _ctx(base.replace(objective=objective, cert_alpha=0.3), info, 0.3))
    if objective == "mtl-ibp":
        _close(lm, 0.3 * l_cert + 0.7 * l_adv)
    elif objective == "exp-ibp":
        _close(lm, l_cert ** 0.3 * l_adv ** 0.7)
    else:
        assert float(l_adv) - 1e-6 <= float(lm) <= float(l_cert) + 1e-6


@pytest.mark.parametrize("relaxation", ["ibp", "crown"])
def test_taps_with_the_split_at_the_output_is_ibp(relaxation):
    """taps_head=0: the head is the last affine layer, where the latent search reaches the minimising vertex, so the
    estimate is the relaxation's own bound on the latent box: without the multiplier the loss and its gradients are
    IBP's (for ibp), with it the loss is IBP's squared."""
    x, y, info = _toy()
    model = _net(x.shape[1], classes=3)
    y = y + (x[:, 0] > 0.5).long()  # three classes, so the latent search has two targets per sample
    cert = _cfg(objective="certified", relaxation="ibp")
    l_ibp, g_ibp, _ = _loss_and_grads("certified", model, x, y, _ctx(cert, info, 0.3))
    cfg = cert.replace(objective="taps", relaxation=relaxation, taps_head=0, taps_ibp_mult=False, taps_grad_scale=1.0,
                       attack_steps=3)
    l_t, g_t, st = _loss_and_grads("taps", model, x, y, _ctx(cfg, info, 0.3))
    if relaxation == "ibp":
        _close(l_t, l_ibp)
        for a, b in zip(g_t, g_ibp):
            _close(a, b, rtol=1e-4, atol=1e-6)
    else:  # CROWN's tighter latent box: an estimate below IBP's loss
        assert float(l_t) <= float(l_ibp) + 1e-6
    l_m, _, _ = _loss_and_grads("taps", model, x, y, _ctx(cfg.replace(taps_ibp_mult=True, relaxation="ibp"), info, 0.3))
    _close(l_m, l_ibp ** 2)
    # a deeper head: the estimate lies between the attack's margins and the certified bound
    deep = cfg.replace(relaxation="ibp", taps_head=1)
    l_d, _, _ = _loss_and_grads("taps", model, x, y, _ctx(deep, info, 0.3))
    assert float(l_d) <= float(l_ibp) + 1e-6
    # inside the ε ramp TAPS trains with the certified loss (as the authors anneal)
    ramp = deep.replace(eps_ramp_epochs=5)
    l_r, _, _ = _loss_and_grads("taps", model, x, y, _ctx(ramp, info, 0.3, t=1.0))
    _close(l_r, l_ibp)
    with pytest.raises(CertlabError, match="taps_head=2 needs a model with at least 3"):
        OBJECTIVES["taps"](model, x, y, _ctx(deep.replace(taps_head=2), info, 0.3))


def test_taps_targets_searches_the_most_violated_classes_and_keeps_bounds_for_the_rest():
    """taps_targets = K − 1 is the full search; k < K − 1 searches the k classes with the lowest certified margins:
    their columns are the searched estimates, the others the bounds themselves (so the loss lies between the full
    TAPS loss and the certified loss), and the gradients stay finite."""
    x, y, info = _toy()
    model = _net(x.shape[1], classes=5)
    y = (y + 2 * (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()) % 5
    cfg = _cfg(objective="taps", taps_head=1, taps_ibp_mult=False, taps_grad_scale=1.0)
    full, _, _ = _loss_and_grads("taps", model, x, y, _ctx(cfg, info, 0.3))
    same, _, _ = _loss_and_grads("taps", model, x, y, _ctx(cfg.replace(taps_targets=4), info, 0.3))
    _close(same, full)
    cert, _, _ = _loss_and_grads("certified", model, x, y, _ctx(cfg.replace(objective="certified"), info, 0.3))
    one, grads, _ = _loss_and_grads("taps", model, x, y, _ctx(cfg.replace(taps_targets=1), info, 0.3))
    assert float(full) - 1e-6 <= float(one) <= float(cert) + 1e-6
    assert float(one) < float(cert) - 1e-4  # the searched class made a difference
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    m = torch.tensor([[0.0, -1.0, 2.0, -3.0, 0.5], [1.0, 0.0, -2.0, 4.0, -0.1]])
    assert latent.worst_targets(m, torch.tensor([0, 1]), 2).sort(1).values.tolist() == [[1, 3], [2, 4]]
    with pytest.raises(CertlabError, match="taps_targets"):
        _cfg(objective="taps", taps_targets=-1)


def test_staps_with_lambda_one_is_taps():
    x, y, info = _toy()
    model = _net(x.shape[1])
    cfg = _cfg(objective="taps", taps_head=1)
    l_t, g_t, _ = _loss_and_grads("taps", model, x, y, _ctx(cfg, info, 0.3))
    l_s, g_s, _ = _loss_and_grads("staps", model, x, y, _ctx(cfg.replace(objective="staps", sabr_lambda=1.0), info, 0.3))
    _close(l_s, l_t)
    for a, b in zip(g_s, g_t):
        _close(a, b)


# -- SABR's small set -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linf", "l2", "segment"])
def test_sabr_small_set_lies_inside_the_threat_set(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 5, generator=g)
    x[:4] = 0.0  # on the domain's edge
    if kind == "linf":
        threat = LinfBall(0.3, domain=(0.0, 1.0))
    elif kind == "l2":
        threat = L2Ball(0.5, domain=(0.0, 1.0))
    else:
        threat = SegmentUnion(torch.randn(1, 5, generator=g), 0.4, domain=(0.0, 1.0))
    z = threat.project(x + 0.5 * torch.randn(x.shape, generator=g), x)
    for lam in (0.1, 0.4, 1.0):
        c, small = latent.small_set(threat, x, z, float(threat.eps), lam)
        assert threat.contains(c, x).all()
        pts = small.sample(c, 64, generator=g)
        for p in pts:
            assert threat.contains(p, x, tol=1e-5).all()
        if lam == 1.0:
            assert torch.equal(c, x)


# -- gradients, training --------------------------------------------------------------------------------------
def _cnn(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(certlab.nn.Normalize(0.5, 0.3), nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, 2, 1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, classes))


@pytest.mark.parametrize("objective", SOTA)
@pytest.mark.parametrize("norm", ["linf", "l2", "segments"])
def test_gradients_reach_every_parameter_and_are_finite(objective, norm):
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    info = cdata.info("mnist")
    model = _cnn()
    eps = 0.1 if norm == "linf" else 0.5
    cfg = TrainConfig.from_dict({"dataset": "mnist", "objective": objective, "norm": norm, "eps": eps,
                                 "attack_steps": 3, "kappa_start": 0.2, "sabr_lambda": 0.5, "cert_alpha": 0.5})
    ctx = StepContext(cfg, lambda xx, e: ThreatMaker("linf" if norm == "linf" else "l2", "mnist", info)(xx, e)
                      if norm != "segments" else SegmentUnion(torch.randn(1, 1, 8, 8, generator=g), e, domain=(0, 1)),
                      eps, 0.2, 1.0, 100.0, seed=3)
    loss, st = OBJECTIVES[objective](model, x, y, ctx)
    assert math.isfinite(float(loss.detach())) and 0 <= st["correct"] <= 12
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for (name, _), gr in zip(model.named_parameters(), grads):
        assert gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0, name


def test_taps_with_batchnorm_and_a_relaxation_other_than_ibp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16),
                          nn.ReLU(), nn.Linear(16, 2)).train()
    x, y, info = _toy(64)
    for objective, relaxation in [("taps", "crown-ibp"), ("staps", "crown"), ("sabr", "crown-ibp"),
                                  ("cc-ibp", "crown")]:
        cfg = _cfg(objective=objective, relaxation=relaxation, beta_start=0.5, fast_ibp_reg=True, eps_ramp_epochs=1)
        loss, st = OBJECTIVES[objective](model, x, y, _ctx(cfg, info, 0.2, t=0.5))  # in the ramp: regularisers on
        loss.backward()
        assert "reg_tight" in st
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()
    loss, _ = OBJECTIVES["taps"](model, x, y, _ctx(_cfg(objective="taps", relaxation="crown"), info, 0.2))
    loss.backward()


@pytest.mark.parametrize("objective", SOTA)
def test_short_run_lowers_the_loss(objective):
    x, y, info = _toy()
    cfg = _cfg(objective=objective, sabr_lambda=0.3, cert_alpha=0.5)
    model = _net(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctx = _ctx(cfg, info, 0.3)
    f = OBJECTIVES[objective]
    first = float(f(model, x, y, ctx)[0].detach())
    for _ in range(40):
        loss, _ = f(model, x, y, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(f(model, x, y, ctx)[0].detach()) < 0.8 * first


# -- certification of the trained models ----------------------------------------------------------------------
def test_sabr_model_is_certified_over_the_whole_set_by_sound_verifiers(tmp_path, monkeypatch):
    """Validation and evaluation certify S(x, ε) with sound methods; SABR's small set would certify more."""
    import certlab.train.loop as loop

    seen = []
    real = loop._certify

    def spy(model, x, y, threat, method):
        seen.append((float(threat.eps), method))
        return real(model, x, y, threat, method=method)

    monkeypatch.setattr(loop, "_certify", spy)
    cfg = {"dataset": "linsep", "data": {"d": 6, "n": 300, "margin": 1.0, "sigma": 1.0}, "model": "mlp",
           "model_params": {"hidden": [16]}, "norm": "linf", "eps": 0.4, "epochs": 2, "batch_size": 50, "lr": 1e-2,
           "objective": "sabr", "sabr_lambda": 0.2, "attack_steps": 3, "eval_certify": ["crown"],
           "eval_attacks": [], "val_n": 60, "seed": 0}
    res = train(cfg, tmp_path / "sabr", progress=False)["eval"]
    assert seen and all(e == pytest.approx(0.4) and m == "ibp" for e, m in seen)
    model, tc = load_run(tmp_path / "sabr")
    test = cdata.load("linsep", "test", d=6, n=300, margin=1.0, sigma=1.0)
    x, y = test.x[:res["n"]], test.y[:res["n"]]
    full = LinfBall(0.4, domain=None if test.info.domain is None else tuple(test.info.domain))
    cert_full = certlab.certify(model, x, y, full, method="crown")
    assert res["certified_error"]["crown"] == pytest.approx(1 - float(cert_full.float().mean()))
    small = full.with_eps(0.4 * 0.2)  # the set SABR propagated, around x itself: a certificate of nothing
    cert_small = certlab.certify(model, x, y, small, method="crown")
    assert (cert_small | ~cert_full).all() and cert_small.sum() > cert_full.sum()
    again = evaluate_run(tmp_path / "sabr", certify=["crown", "ibp"], attacks=[], write=False)
    assert again["eps"] == pytest.approx(0.4) and again["certified_error"]["crown"] == res["certified_error"]["crown"]


def test_each_objective_trains_from_the_cli(tmp_path):
    from certlab.cli import main

    for objective in SOTA:
        out = tmp_path / objective
        rc = main(["train", "--dataset", "linsep", "--data", "d=4,n=120", "--model", "mlp", "--model-params",
                   "hidden=[8]", "--objective", objective, "--eps", "0.2", "--epochs", "1", "--batch-size", "60",
                   "--attack-steps", "2", "--eval-certify", "crown", "--eval-attacks", "", "--val-n", "20",
                   "--taps-head", "0", "--no-progress", "--out", str(out)])
        assert rc == 0 and (out / "eval.json").exists()
