"""Training: schedules, config, objectives (each lowers its loss), certified training vs standard training."""

import math

import pytest
import torch
from torch import nn

import certlab
from certlab.errors import CertlabError
from certlab.threat import L2Ball, LinfBall
from certlab.train import TrainConfig, train
from certlab.train import schedules
from certlab.train.objectives import OBJECTIVES, StepContext, fast_ibp_regularisers, worst_case_ce
from certlab.train.threats import ThreatMaker
from certlab import data as cdata


# -- schedules ------------------------------------------------------------------------------------------------
def test_linear_eps_kappa_beta_schedule():
    cfg = TrainConfig(eps=0.2, eps_start_epoch=1, eps_ramp_epochs=4, kappa_start=1.0, kappa_end=0.5,
                      beta_start=1.0, beta_end=0.0)
    assert schedules.eps_at(cfg, 0.5) == 0.0
    assert schedules.eps_at(cfg, 1.0) == 0.0
    assert schedules.eps_at(cfg, 3.0) == pytest.approx(0.1)
    assert schedules.eps_at(cfg, 5.0) == pytest.approx(0.2)
    assert schedules.eps_at(cfg, 9.0) == pytest.approx(0.2)
    assert schedules.kappa_at(cfg, 3.0) == pytest.approx(0.75)
    assert schedules.beta_at(cfg, 3.0) == pytest.approx(0.5)
    assert schedules.in_warmup(cfg, 4.9) and not schedules.in_warmup(cfg, 5.0)
    # no ramp: full eps from the start epoch on
    cfg0 = TrainConfig(eps=0.3)
    assert schedules.eps_at(cfg0, 0.0) == pytest.approx(0.3)


def test_smoothed_schedule_shape():
    s = torch.linspace(0, 1, 401).tolist()
    g = [schedules.smoothed(v) for v in s]
    assert g[0] == 0 and g[-1] == pytest.approx(1.0)
    assert all(b >= a for a, b in zip(g, g[1:]))  # monotone
    # slow start: below the linear ramp everywhere inside (0, 1)
    assert all(gv < sv for sv, gv in zip(s[1:-1], g[1:-1]))
    # continuous value and slope at the mid point 1/4
    m, h = schedules.MID, 1e-6
    left = (schedules.smoothed(m) - schedules.smoothed(m - h)) / h
    right = (schedules.smoothed(m + h) - schedules.smoothed(m)) / h
    assert left == pytest.approx(right, rel=1e-3)
    cfg = TrainConfig(eps=0.1, eps_schedule="smoothed", eps_ramp_epochs=4)
    assert 0 < schedules.eps_at(cfg, 1.0) < 0.1 * 0.25
    assert schedules.eps_at(cfg, 4.0) == pytest.approx(0.1)


# -- config ---------------------------------------------------------------------------------------------------
def test_config_yaml_round_trip(tmp_path):
    cfg = TrainConfig(dataset="mnist", data={"n": 100}, model="wong-small", objective="certified",
                      relaxation="CROWN-IBP", eps=0.15, lr_schedule="multistep", lr_milestones=[3, 5],
                      eval_certify=["ibp", "crown"], grad_clip=10.0)
    assert cfg.relaxation == "crown-ibp"  # resolved
    p = tmp_path / "c.yaml"
    cfg.save(p)
    back = TrainConfig.load(p)
    assert back == cfg
    assert TrainConfig.from_yaml(cfg.to_yaml()).to_dict() == cfg.to_dict()


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(CertlabError, match="unknown config keys: bogus, zzz"):
        TrainConfig.from_dict({"bogus": 1, "zzz": 2, "eps": 0.1})
    for bad, msg in [({"eps": -0.1}, "eps must be >= 0"), ({"objective": "magic"}, "unknown objective"),
                     ({"relaxation": "nope"}, "unknown relaxation"), ({"epochs": 0}, "epochs must be >= 1"),
                     ({"kappa_start": 2.0}, "kappa_start must lie in"), ({"lr_schedule": "step"}, "lr_milestones"),
                     ({"objective": "pgd", "attack": "fgsm9"}, "unknown attack"),
                     ({"attack": "apgd-ce", "attack_step": 0.5}, "attack_step applies to attack 'pgd' only")]:
        with pytest.raises(CertlabError, match=msg):
            TrainConfig.from_dict(bad)


def test_train_rejects_unknown_dataset_and_model(tmp_path):
    with pytest.raises(CertlabError, match="unknown dataset"):
        train({"dataset": "imagenet-9000", "epochs": 1}, tmp_path / "a", progress=False)
    with pytest.raises(CertlabError, match="unknown model"):
        train({"dataset": "linsep", "model": "transformer", "epochs": 1}, tmp_path / "b", progress=False)


def test_val_split_holds_out_training_samples_for_model_selection(tmp_path, monkeypatch):
    """val_split > 0: that many training samples (seeded, disjoint from the rest) are never trained on and are what
    validation (best.pt) reads; 0: the first val_n test samples, as the summary says. Too large a split is an error."""
    from certlab.train import loop

    cfg = TrainConfig(dataset="linsep", data={"d": 4, "n": 60}, model="mlp", model_params={"hidden": [8]},
                      epochs=2, batch_size=20, eval_certify=["ibp"], eval_attacks=[], val_n=10, val_split=15)
    train_set, test_set, _ = loop.load_data(cfg)
    xt, yt, xv, yv, desc = loop.split_validation(cfg, train_set, test_set)
    assert xt.shape[0] == 45 and xv.shape[0] == 15 and "15 held-out training" in desc
    rows = lambda a: {tuple(r.tolist()) for r in a}  # noqa: E731
    assert rows(xt) | rows(xv) == rows(train_set.x) and not rows(xt) & rows(xv)
    assert torch.equal(loop.split_validation(cfg, train_set, test_set)[2], xv)  # the same split every time
    seen = {"train": [], "val": []}
    real_validate = loop._validate

    def spy_validate(model, cfg_, val, maker, device):
        seen["val"].append(rows(val[0]))
        return real_validate(model, cfg_, val, maker, device)

    real_objective = loop.OBJECTIVES[cfg.objective]

    def spy_objective(model, x, y, ctx):
        seen["train"].append(rows(x))
        return real_objective(model, x, y, ctx)

    monkeypatch.setattr(loop, "_validate", spy_validate)
    monkeypatch.setitem(loop.OBJECTIVES, cfg.objective, spy_objective)
    summary = train(cfg, tmp_path / "split", progress=False)
    assert summary["validation"] == desc
    assert all(v == rows(xv) for v in seen["val"]) and len(seen["val"]) == 2
    trained = set().union(*seen["train"])
    assert trained == rows(xt)  # every kept sample, and no held-out one
    summary = train(cfg.to_dict() | {"val_split": 0}, tmp_path / "test", progress=False)
    assert summary["validation"] == "the first 10 test samples"
    with pytest.raises(CertlabError, match="val_split=60 leaves no training samples"):
        train(cfg.to_dict() | {"val_split": 60}, tmp_path / "bad", progress=False)
    with pytest.raises(CertlabError, match="val_split must be"):
        TrainConfig(val_split=-1)


def test_validation_records_no_gradients(tmp_path, monkeypatch):
    """The per-epoch validation (bounds, certification, the clean forward) runs without autograd graphs."""
    from certlab.train import loop

    seen = []
    real = loop.relu_bounds

    def spy(*a, **k):
        seen.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(loop, "relu_bounds", spy)
    train({"dataset": "linsep", "data": {"d": 4, "n": 40}, "model": "mlp", "model_params": {"hidden": [8]},
           "objective": "certified", "relaxation": "ibp", "eps": 0.1, "epochs": 1, "batch_size": 20, "val_n": 10},
          tmp_path / "r", progress=False, evaluate=False)
    assert seen and not any(seen)


# -- objectives -----------------------------------------------------------------------------------------------
def _toy(n=128, d=6, seed=0):
    ds = cdata.load("linsep", "train", d=d, n=n, margin=1.0, sigma=0.5, seed=seed)
    return ds.x, ds.y, ds.info


def _mlp(d, seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, 32)] + ([nn.BatchNorm1d(32)] if bn else []) + [nn.ReLU(), nn.Linear(32, 2)]
    return nn.Sequential(*layers)


def _ctx(cfg, info, eps):
    maker = ThreatMaker(cfg.norm, info.name, info, cfg.k, cfg.seed)
    return StepContext(cfg, maker, eps, cfg.kappa_start or 0.0, cfg.beta_start, 100.0, seed=1)


@pytest.mark.parametrize("objective,extra", [
    ("standard", {}),
    ("pgd", {"attack": "pgd", "attack_steps": 5}),
    ("pgd", {"attack": "apgd-ce", "attack_steps": 5}),
    ("pgd", {"attack": "pgd", "attack_steps": 1, "attack_step": 1.25}),
    ("trades", {"attack_steps": 3, "trades_beta": 3.0}),
    ("certified", {"relaxation": "ibp"}),
    ("certified", {"relaxation": "crown-ibp", "beta_start": 0.5}),
    ("certified", {"relaxation": "crown", "norm": "l2"}),
    ("adaptive", {"relaxation": "ibp", "kappa_start": 0.5}),
    ("certified", {"relaxation": "ibp", "norm": "segments", "k": 2}),
])
def test_objective_lowers_its_loss(objective, extra):
    x, y, info = _toy()
    cfg = TrainConfig.from_dict({"dataset": "linsep", "objective": objective, "eps": 0.3, **extra})
    model = _mlp(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctx = _ctx(cfg, info, 0.3)
    f = OBJECTIVES[objective]
    first, _ = f(model, x, y, ctx)
    first = float(first.detach())
    for _ in range(30):
        loss, st = f(model, x, y, ctx)
        assert math.isfinite(float(loss.detach())) and 0 <= st["correct"] <= len(y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, _ = f(model, x, y, ctx)
    assert float(last.detach()) < 0.8 * first


def test_certified_loss_is_ce_of_worst_case_logits_and_upper_bounds_clean_ce():
    x, y, info = _toy(64)
    model = _mlp(x.shape[1])
    m = certlab.margins(model, x, y, LinfBall(0.2, domain=None), method="ibp")
    z = -m
    assert torch.all(z.gather(1, y[:, None]) == 0)
    ce = torch.nn.functional.cross_entropy(model(x), y)
    assert float(worst_case_ce(m, y).detach()) >= float(ce.detach()) - 1e-6  # worst case ≥ clean (margins ≤ clean margins)
    cfg = TrainConfig(dataset="linsep", objective="certified", eps=0.0)
    loss0, _ = OBJECTIVES["certified"](model, x, y, _ctx(cfg, info, 0.0))
    assert float(loss0.detach()) == pytest.approx(float(ce.detach()), rel=1e-5)  # ε = 0: exactly the clean CE


def test_certified_objective_with_batchnorm_in_train_mode():
    x, y, info = _toy(64)
    model = _mlp(x.shape[1], bn=True).train()
    cfg = TrainConfig(dataset="linsep", objective="certified", relaxation="crown-ibp", eps=0.1)
    loss, st = OBJECTIVES["certified"](model, x, y, _ctx(cfg, info, 0.1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fast_ibp_regularisers_are_differentiable_and_sane():
    x, y, info = _toy(64)
    model = _mlp(x.shape[1])
    th = L2Ball(0.3, domain=None)
    relus = certlab.bounds.relu_bounds(model, x, th, "ibp")
    tight, bal = fast_ibp_regularisers(relus, th, x)
    assert 0 <= float(tight.detach()) <= 1 and 0 <= float(bal.detach()) <= 1
    (tight + bal).backward()
    assert model[0].weight.grad is not None
    # all-dead layer: ReLU balance at its worst (1)
    dead = _mlp(x.shape[1])
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)
    relus = certlab.bounds.relu_bounds(dead, x, th, "ibp")
    assert float(fast_ibp_regularisers(relus, th, x)[1].detach()) == pytest.approx(1.0)
    # warm-up training with the regulariser switched on runs and reports the terms
    cfg = TrainConfig(dataset="linsep", objective="certified", eps=0.3, fast_ibp_reg=True, eps_ramp_epochs=10)
    ctx = StepContext(cfg, ThreatMaker("linf", "linsep", info), 0.1, 0.0, 1.0, 1.0, 0)
    _, st = OBJECTIVES["certified"](model, x, y, ctx)
    assert "reg_tight" in st and "reg_relu" in st


def test_certified_training_raises_certified_accuracy(tmp_path):
    base = {"dataset": "linsep", "data": {"d": 8, "n": 400, "margin": 1.0, "sigma": 1.0}, "model": "mlp",
            "model_params": {"hidden": [32]}, "norm": "linf", "eps": 0.5, "epochs": 6, "batch_size": 50,
            "lr": 5e-3, "eval_certify": ["ibp"], "eval_attacks": [], "val_n": 100, "seed": 1}
    std = train({**base, "objective": "standard"}, tmp_path / "std", progress=False)["eval"]
    ibp = train({**base, "objective": "certified", "relaxation": "ibp", "eps_ramp_epochs": 3, "kappa_start": 1.0},
                tmp_path / "ibp", progress=False)["eval"]
    assert ibp["certified_error"]["ibp"] < std["certified_error"]["ibp"] - 0.2
    assert ibp["clean_error"] < 0.2


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_ibp_objective_reuses_the_bound_pass_logits(kappa):
    """Certified IBP training takes the clean logits from the bound graph's full-batch forward (no extra forward):
    they equal model(x), and with κ > 0 the clean CE still reaches every parameter."""
    from certlab.train.objectives import margins_and_relus

    torch.manual_seed(0)
    model = torch.nn.Sequential(certlab.nn.Normalize(0.5, 0.25), torch.nn.Conv2d(1, 3, 3, 2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    x, y = torch.rand(6, 1, 14, 14), torch.tensor([0, 1, 2, 3, 0, 1])
    m, _, logits = margins_and_relus(model, x, y, certlab.LinfBall(0.05), "ibp", False, want_logits=True)
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, certlab.margins(model, x, y, certlab.LinfBall(0.05), "ibp"))
    loss = kappa * torch.nn.functional.cross_entropy(logits, y) + m.sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(196, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                             torch.nn.Linear(8, 4))
    assert margins_and_relus(bn, x, y, certlab.LinfBall(0.05), "ibp", False, want_logits=True)[2] is None


def test_segment_directions_signal_vs_random_on_spheres():
    ds = cdata.load("spheres", "train", d=10, n=64, margin=20.0, seed=0)
    x = ds.x[:16]
    signal = ThreatMaker("segments", "spheres", ds.info, k=3, seed=0, dirs="signal")
    rand = ThreatMaker("segments", "spheres", ds.info, k=3, seed=0)   # the default: the paper's random directions
    assert TrainConfig().segment_dirs == "random" and rand.dirs == "random"
    ds_sig, ds_rand = signal.directions(x), rand.directions(x)
    radial = x / x.norm(dim=1, keepdim=True)
    assert ds_sig.shape == (16, 3, 10) and torch.allclose(ds_sig[:, 0], radial, atol=1e-5)   # per sample, radial first
    assert ds_rand.shape == (3, 10)                                                           # shared by every sample
    assert torch.allclose(ds_rand @ ds_rand.T, torch.eye(3), atol=1e-5)
    assert torch.equal(rand.directions(ds.x[16:32]), ds_rand)                                 # independent of the batch
    assert not torch.allclose(ds_rand[0].abs(), radial[0].abs(), atol=1e-2)
    assert torch.equal(ThreatMaker("segments", "spheres", ds.info, k=3, seed=1, dirs="random").directions(x), ds_rand) \
        is False
    with pytest.raises(CertlabError, match="segment directions"):
        ThreatMaker("segments", "spheres", ds.info, k=3, dirs="radial")
    with pytest.raises(CertlabError, match="segment_dirs"):
        TrainConfig.from_dict({"segment_dirs": "axes"}).validate()


# -- optimizer ------------------------------------------------------------------------------------------------
def test_adam_is_fused_when_available_and_takes_the_same_steps_as_plain_adam():
    from certlab.train.setup import make_optimizer

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    b = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    b.load_state_dict(a.state_dict())
    w0 = a[0].weight.detach().clone()
    cfg = TrainConfig(optimizer="adam", lr=1e-2, weight_decay=1e-4)
    opt_a = make_optimizer(cfg, a.parameters())
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-4, foreach=False)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert opt_a.defaults.get("fused") is True
    x = torch.randn(32, 6)
    for _ in range(20):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            m[0].weight.grad[:, 0] = 0  # a dead input: exact zeros in Adam's second moment
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), (pa - pb).abs().max()
    # the optimizer moved the weights (the comparison is not trivially between two untouched models)
    assert (a[0].weight - w0).abs().max() > 1e-2
    sgd = make_optimizer(TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9), a.parameters())
    assert isinstance(sgd, torch.optim.SGD)


def test_resumed_optimizer_keeps_this_machines_kernel_choice():
    """A checkpoint stores its writer's `fused` flag; resuming keeps the kernel make_optimizer picked here (a fused
    state on a torch without the fused CPU kernel would fail at the first step) and the moments and step count."""
    from certlab.train.setup import load_optimizer_state, make_optimizer

    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    writer = torch.optim.Adam(m.parameters(), lr=1e-2, fused=True)  # the checkpoint's writer had the fused kernel
    m(torch.randn(8, 4)).sum().backward()
    writer.step()
    saved = writer.state_dict()
    assert saved["param_groups"][0]["fused"] is True
    plain = torch.optim.Adam(m.parameters(), lr=1e-2)  # what make_optimizer builds where fused is unavailable
    load_optimizer_state(plain, saved)
    assert not plain.param_groups[0]["fused"]
    assert float(plain.state[m.weight]["step"]) == 1.0
    assert torch.equal(plain.state[m.weight]["exp_avg"], writer.state[m.weight]["exp_avg"])
    plain.step()  # runs on the plain path
    mine = make_optimizer(TrainConfig(optimizer="adam", lr=1e-2), m.parameters())
    load_optimizer_state(mine, torch.optim.Adam(m.parameters(), lr=1e-2).state_dict())  # a plain checkpoint
    assert mine.param_groups[0]["fused"] == mine.defaults["fused"]
