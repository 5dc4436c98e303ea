"""Default training recipe: auto schedule values, their resolution, the recipe line, and the at-chance warning."""

import json
import os

import pytest

from certlab.errors import CertlabError
from certlab.train import TrainConfig, schedules, train
from certlab.train.loop import at_chance, resolve_for_run

RAMPED = ("certified", "adaptive", "sabr", "taps", "staps", "mtl-ibp", "exp-ibp", "cc-ibp")
AUTO = ("eps_start_epoch", "eps_ramp_epochs", "eps_schedule", "kappa_start", "kappa_end", "ibp_init")


def _values(cfg):
    return {n: getattr(cfg, n) for n in AUTO}


def test_fields_default_to_auto_and_every_certified_type_objective_is_ramped():
    cfg = TrainConfig()
    assert all(getattr(cfg, n) is None for n in AUTO)
    assert set(schedules.RAMPED) == set(RAMPED)
    from certlab.train.objectives import CERTIFIED
    assert set(CERTIFIED) == set(RAMPED)


@pytest.mark.parametrize("objective", RAMPED)
def test_auto_recipe_of_each_certified_type_objective(objective):
    r = TrainConfig(objective=objective, epochs=20).resolved()
    assert r.eps_start_epoch == pytest.approx(1.0) and r.eps_ramp_epochs == pytest.approx(10.0)
    assert r.eps_schedule == "smoothed"
    if objective == "adaptive":  # ACERT: κ a constant weight of the clean loss, 0 by default
        assert (r.kappa_start, r.kappa_end) == (0.0, 0.0)
    else:
        assert (r.kappa_start, r.kappa_end) == (1.0, 0.0)
    # a 3-epoch run: the recipe line of the brief
    line = schedules.describe(TrainConfig(objective=objective, epochs=3, eps=0.1))
    assert "warm-up 0.15 ep" in line and "ε ramp 1.5 ep" in line and "(smoothed)" in line and "(auto)" in line
    assert ("κ 0" in line) if objective == "adaptive" else ("κ 1→0" in line)


@pytest.mark.parametrize("objective", ("standard", "pgd", "trades"))
def test_other_objectives_keep_no_ramp(objective):
    r = TrainConfig(objective=objective, epochs=20).resolved()
    assert _values(r) == {"eps_start_epoch": 0.0, "eps_ramp_epochs": 0.0, "eps_schedule": "linear",
                          "kappa_start": 0.0, "kappa_end": 0.0, "ibp_init": False}
    assert schedules.eps_at(TrainConfig(objective=objective, eps=0.3), 0.0) == pytest.approx(0.3)


def test_recipe_schedule_values_over_time():
    cfg = TrainConfig(objective="certified", epochs=10, eps=0.2)  # warm-up 0.5 ep, ramp 5 ep
    assert schedules.eps_at(cfg, 0.49) == 0.0 and schedules.kappa_at(cfg, 0.49) == 1.0
    assert 0 < schedules.eps_at(cfg, 1.5) < 0.2 * 0.25  # the smoothed slow start
    assert schedules.kappa_at(cfg, 3.0) == pytest.approx(0.5)
    assert schedules.in_warmup(cfg, 5.49) and not schedules.in_warmup(cfg, 5.5)
    assert schedules.eps_at(cfg, 5.5) == pytest.approx(0.2) and schedules.kappa_at(cfg, 7.0) == 0.0


def test_explicit_values_are_untouched():
    full = {"eps_start_epoch": 2.0, "eps_ramp_epochs": 3.0, "eps_schedule": "linear", "kappa_start": 0.4,
            "kappa_end": 0.1, "ibp_init": False}
    for objective in RAMPED + ("standard", "pgd"):
        cfg = TrainConfig(objective=objective, epochs=20, **full)
        assert cfg.resolved() is cfg and _values(cfg) == full
    # a ramp set by hand (as the study files do): the unset fields keep the plain values, as before auto existed
    r = TrainConfig(objective="certified", epochs=20, eps_ramp_epochs=10).resolved()
    assert _values(r) == {"eps_start_epoch": 0.0, "eps_ramp_epochs": 10, "eps_schedule": "linear",
                          "kappa_start": 0.0, "kappa_end": 0.0, "ibp_init": False}
    r = TrainConfig(objective="sabr", epochs=20, eps_start_epoch=0).resolved()
    assert (r.eps_ramp_epochs, r.kappa_start) == (0.0, 0.0)
    # single explicit fields next to the auto ramp
    r = TrainConfig(objective="certified", epochs=20, kappa_start=0.5, eps_schedule="linear").resolved()
    assert (r.eps_start_epoch, r.eps_ramp_epochs, r.eps_schedule, r.kappa_start, r.kappa_end) == \
        (1.0, 10.0, "linear", 0.5, 0.0)
    r = TrainConfig(objective="adaptive", epochs=20, kappa_start=0.75).resolved()
    assert (r.kappa_start, r.kappa_end) == (0.75, 0.75)  # ACERT's constant κ
    r = TrainConfig(objective="certified", epochs=20, kappa_end=0.2).resolved()
    assert (r.kappa_start, r.kappa_end) == (1.0, 0.2)


def test_auto_in_yaml_and_cli_and_bad_values():
    cfg = TrainConfig.from_yaml("objective: certified\neps_ramp_epochs: auto\nkappa_start: auto\n")
    assert cfg.eps_ramp_epochs is None and cfg.kappa_start is None
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg  # auto survives a YAML round trip
    from certlab.cli import build_parser
    from certlab.train.cli import config_from_args
    args = build_parser().parse_args(["train", "--out", "x", "--objective", "sabr", "--eps-ramp-epochs", "auto",
                                      "--kappa-start", "0.5"])
    c = config_from_args(args)
    assert c.eps_ramp_epochs is None and c.kappa_start == 0.5
    for bad, msg in [({"eps_ramp_epochs": -1}, "eps_ramp_epochs must be >= 0"),
                     ({"eps_start_epoch": -0.5}, "eps_start_epoch must be >= 0"),
                     ({"kappa_start": -0.1}, "kappa_start must be >= 0"), ({"kappa_end": 1.5}, "kappa_end must lie"),
                     ({"eps_schedule": "cosine"}, "unknown eps_schedule"),
                     ({"eps_ramp_epochs": "soon"}, "eps_ramp_epochs must be a finite number")]:
        with pytest.raises(CertlabError, match=msg) as e:
            TrainConfig.from_dict({"objective": "certified", **bad})
        assert "\n" not in str(e.value)


def test_resume_keeps_the_schedule_its_start_resolved():
    stored = TrainConfig(objective="certified", epochs=4).resolved().to_dict()
    assert stored["eps_ramp_epochs"] == 2.0
    longer = resolve_for_run(TrainConfig(objective="certified", epochs=10), stored)
    assert (longer.eps_start_epoch, longer.eps_ramp_epochs, longer.kappa_start) == (0.2, 2.0, 1.0)
    legacy = {**stored, "eps_start_epoch": 0.0, "eps_ramp_epochs": 0.0, "eps_schedule": "linear",
              "kappa_start": 0.0, "kappa_end": 0.0}  # a config stored before auto values existed
    old = resolve_for_run(TrainConfig(objective="certified", epochs=4), legacy)
    assert _values(old) == {k: legacy[k] for k in AUTO}


def test_at_chance_threshold():
    assert at_chance(0.14, 0.1) and not at_chance(0.2, 0.1)
    assert at_chance(0.52, 0.5) and not at_chance(0.6, 0.5)


BASE = {"dataset": "linsep", "data": {"d": 8, "n": 400, "margin": 1.0, "sigma": 1.0}, "model": "mlp",
        "objective": "certified", "eps": 0.1, "batch_size": 50, "val_n": 100, "seed": 0}


def test_default_certified_run_trains_and_stores_its_schedule(tmp_path, capsys):
    s = train({**BASE, "epochs": 4, "lr": 3e-3}, tmp_path / "r", progress=True, evaluate=False)
    err = capsys.readouterr().err
    assert "schedule: warm-up 0.2 ep (ε = 0) (auto), ε ramp 2 ep to 0.1 (smoothed) (auto), κ 1→0" in err
    assert s["warnings"] == [] and "warning" not in err
    last = s["last"]
    assert last["eps"] == pytest.approx(0.1) and last["kappa"] == 0.0
    assert last["train_acc"] > 0.85 and last["val_clean_error"] < 0.15 and last["val_robust_error"] < 0.4
    stored = TrainConfig.load(tmp_path / "r" / "config.yaml")  # the resolved values, for resume and reuse
    assert (stored.eps_start_epoch, stored.eps_ramp_epochs, stored.eps_schedule, stored.kappa_start) == \
        (0.2, 2.0, "smoothed", 1.0)


def test_chance_warning_fires_once_on_a_run_that_cannot_learn(tmp_path, capsys):
    s = train({**BASE, "dataset": "spheres", "data": {"d": 10, "n": 400}, "epochs": 3, "lr": 1e-12},
              tmp_path / "r", progress=False, evaluate=False)
    err = capsys.readouterr().err
    assert len(s["warnings"]) == 1 and err.count("warning:") == 1
    w = s["warnings"][0]
    assert "at chance" in w and "--eps-ramp-epochs" in w and "--lr" in w and "--epochs" in w and "\n" not in w
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, "r", "metrics.jsonl"))]
    assert [bool(r.get("warning")) for r in rows] == [False, True, False]  # first epoch after the ramp (1.65)


def test_ibp_init_auto_on_for_the_sota_objectives_only():
    from certlab.train.config import TrainConfig

    for obj in ("sabr", "taps", "staps", "mtl-ibp", "exp-ibp", "cc-ibp"):
        assert TrainConfig(objective=obj).resolved().ibp_init is True
        assert TrainConfig(objective=obj, ibp_init=False).resolved().ibp_init is False   # a set value stays
    for obj in ("standard", "pgd", "certified", "adaptive"):
        assert TrainConfig(objective=obj).resolved().ibp_init is False
    assert TrainConfig(objective="taps", ibp_init="auto").ibp_init is None
    with pytest.raises(CertlabError, match="ibp_init"):
        TrainConfig(ibp_init="yes please")
