"""Checkpoints and run directories: atomic writes, clear errors on corrupt/foreign files, kill-and-resume equivalence,
and the train / evaluate commands end to end."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from certlab import cli
from certlab.errors import CertlabError, CheckpointError
from certlab.train import checkpoint as ckpt
from certlab.train import evaluate_run, load_run, train

TINY = {"dataset": "spheres", "data": {"d": 5, "n": 200, "margin": 0.5}, "model": "mlp",
        "model_params": {"hidden": [16]}, "norm": "l2", "eps": 0.05, "epochs": 2, "batch_size": 50, "lr": 5e-3,
        "objective": "certified", "relaxation": "ibp", "eval_certify": ["ibp"], "eval_attacks": [], "val_n": 50}


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    p = tmp_path / "last.pt"
    ckpt.save(p, {"arch": "mlp", "model_params": {}, "dataset": {}, "config": {}, "epoch": 1, "model": {}})
    before = p.read_bytes()

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save(p, {"epoch": 2})
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
    assert ckpt.load(p)["epoch"] == 1


def test_corrupt_foreign_and_missing_checkpoints(tmp_path):
    bad = tmp_path / "random.pt"
    bad.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        ckpt.load(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="not a certlab checkpoint"):
        ckpt.load(foreign)
    truncated = tmp_path / "trunc.pt"
    run = tmp_path / "run"
    train(TINY, run, progress=False, evaluate=False)
    truncated.write_bytes((run / "last.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError):
        ckpt.load(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load(tmp_path / "nope.pt")
    # a run directory whose checkpoint was replaced by garbage
    (run / "best.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError):
        load_run(run, "best")
    with pytest.raises(CertlabError, match="run directory not found"):
        evaluate_run(tmp_path / "missing-run")
    model, cfg = load_run(run, "last")
    assert not model.training and cfg.model == "mlp"
    with pytest.raises(CertlabError, match="already holds a run"):
        train(TINY, run, progress=False)


def _state(run):
    return ckpt.load(os.path.join(run, "last.pt"))


def _metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        r.pop("time_s")
    return rows


ARGS = ["--dataset", "spheres", "--data", "d=10,n=1200,margin=0.5", "--model", "mlp", "--model-params",
        "hidden=[32,32]", "--objective", "certified", "--relaxation", "crown-ibp", "--norm", "l2", "--eps", "0.1",
        "--eps-ramp-epochs", "2", "--kappa-start", "1", "--beta-start", "1", "--beta-end", "0", "--epochs", "3",
        "--batch-size", "20", "--lr", "2e-3", "--lr-schedule", "onecycle", "--seed", "3", "--val-n", "100",
        "--no-eval", "--no-progress"]


def _run(out, extra=(), wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "certlab.cli", "train", *ARGS, "--out", str(out), *extra]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        out_, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    return p


def test_kill_and_resume_gives_the_same_result(tmp_path):
    ref = tmp_path / "ref"
    _run(ref)
    run = tmp_path / "run"
    p = _run(run, wait=False)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    assert p.poll() is None, "training finished before it could be killed; make the test run longer"
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = _state(run)["epoch"]
    assert 1 <= killed_at < 3
    assert not (run / "summary.json").exists()
    _run(run, ["--resume"])
    a, b = _state(ref), _state(run)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _metrics(ref) == _metrics(run)
    assert a["global_step"] == b["global_step"]


def test_cli_train_and_evaluate_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli-run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dataset: spheres\ndata: {d: 5, n: 200, margin: 0.5}\nmodel: mlp\nmodel_params: {hidden: [16]}\n"
                        "epochs: 5\nnorm: l2\neps: 0.05\nobjective: pgd\nattack_steps: 3\nval_n: 50\n"
                        "eval_attacks: [apgd-ce]\neval_certify: [ibp, crown]\n")
    rc = cli.main(["train", "--config", str(cfg_file), "--epochs", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "cert err (crown)" in text and "clean err" in text
    for f in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "eval.json", "summary.json"):
        assert (out / f).exists(), f
    assert "epochs: 2" in (out / "config.yaml").read_text()  # the command line overrides the file
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    rc = cli.main(["evaluate", str(out), "--norm", "l2", "--eps", "0.1", "--certify", "ibp,crown", "--attack",
                   "apgd-ce", "--n", "40", "--acr", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["n"] == 40 and res["eps"] == 0.1 and set(res["certified_error"]) == {"ibp", "crown"}
    assert res["clean_error"] <= res["robust_error"] <= min(res["certified_error"].values()) + 1e-9
    assert 0 <= res["acr"]["crown"] <= 1
    # --restarts reaches every attack; restarts only add attacks on the samples still unfooled (same first pass)
    import certlab.attacks as atk

    seen, real = [], atk.robust_error

    def spy(*a, **kw):
        seen.append(kw.get("restarts"))
        return real(*a, **kw)

    atk.robust_error = spy
    try:
        rc = cli.main(["evaluate", str(out), "--norm", "l2", "--eps", "0.1", "--certify", "none", "--attack",
                       "apgd-ce", "--n", "40", "--restarts", "3", "--no-progress", "--output", str(tmp_path / "r3.json")])
    finally:
        atk.robust_error = real
    assert rc == 0 and seen and set(seen) == {3}
    r3 = json.loads((tmp_path / "r3.json").read_text())
    assert r3["restarts"] == 3 and res["restarts"] == 1 and r3["robust_error"] >= res["robust_error"]
    # --output keeps eval.json as it is
    before = (out / "eval.json").read_text()
    rc = cli.main(["evaluate", str(out), "--norm", "l2", "--eps", "0.05", "--certify", "ibp", "--attack", "none",
                   "--n", "20", "--no-progress", "--output", str(tmp_path / "small.json")])
    assert rc == 0 and (out / "eval.json").read_text() == before
    small = json.loads((tmp_path / "small.json").read_text())
    assert small["n"] == 20 and small["eps"] == 0.05 and small["robust_error"] is None
    # bad input: one-line errors, exit code 2
    capsys.readouterr()
    for argv, msg in [(["evaluate", str(tmp_path / "nope")], "run directory not found"),
                      (["train", "--dataset", "nosuch", "--out", str(tmp_path / "x")], "unknown dataset"),
                      (["train", "--objective", "magic", "--out", str(tmp_path / "y")], "unknown objective"),
                      (["train", "--eps=-1", "--out", str(tmp_path / "z")], "eps must be >= 0"),
                      (["train", "--model", "nosuch", "--out", str(tmp_path / "w")], "unknown model"),
                      (["evaluate", str(out), "--output", str(tmp_path / "no" / "x.json")], "does not exist"),
                      (["evaluate", str(out), "--restarts", "0"], "--restarts must be a positive integer"),
                      (["train", "--eval-restarts", "0", "--out", str(tmp_path / "v")], "eval_restarts")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_a_finished_run_resumed_with_new_evaluation_settings_evaluates_with_them(tmp_path):
    """eval_certify may change on resume (RESUME_MUTABLE): a run resumed after its last epoch trains nothing and
    evaluates with the new list, not the one stored in its checkpoint."""
    run = tmp_path / "run"
    first = train(dict(TINY), str(run), progress=False)
    assert set(first["eval"]["certified_error"]) == {"ibp"}
    epoch = ckpt.load(str(run / "last.pt"))["epoch"]
    again = train(dict(TINY, eval_certify=["ibp", "crown"]), str(run), resume=True, progress=False)
    assert set(again["eval"]["certified_error"]) == {"ibp", "crown"}
    assert ckpt.load(str(run / "last.pt"))["epoch"] == epoch  # nothing more was trained
    assert json.loads((run / "eval.json").read_text())["certified_error"].keys() == {"ibp", "crown"}
