"""What a new user meets: progress off a terminal, --resume from the stored config, readable report files, clear
one-line errors, help texts, no leftovers of failed runs."""

import argparse
import io
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest
import torch

from certlab import cli, progress
from certlab.errors import CertlabError, CheckpointError
from certlab.train import checkpoint as ckpt
from certlab.train import train

TINY = {"dataset": "spheres", "data": {"d": 5, "n": 200, "margin": 0.5}, "model": "mlp",
        "model_params": {"hidden": [16]}, "norm": "l2", "eps": 0.05, "epochs": 2, "batch_size": 50, "lr": 5e-3,
        "objective": "certified", "relaxation": "ibp", "eval_certify": ["ibp"], "eval_attacks": [], "val_n": 50}


class Recorder(io.StringIO):
    """A non-terminal stream that notes when each line was written."""

    def __init__(self):
        super().__init__()
        self.times = []

    def write(self, s):
        self.times.extend(time.monotonic() for _ in range(s.count("\n")))
        return super().write(s)

    def isatty(self):
        return False


# ---- progress -------------------------------------------------------------------------------------------------
def test_log_bar_prints_rate_limited_lines_with_step_elapsed_and_eta():
    out = Recorder()
    every = 0.2
    b = progress.LogBar(20, "epoch 1/3", "steps", every=every, stream=out)
    t0 = time.monotonic()
    for i in range(20):
        time.sleep(0.06)
        b.update(1)
        b.set_postfix({"loss": f"{1 / (i + 1):.3f}"})
    b.close()
    took = time.monotonic() - t0
    lines = out.getvalue().splitlines()
    periodic, last = lines[:-1], lines[-1]
    assert periodic and all(l.startswith("epoch 1/3: steps ") and "elapsed " in l and "ETA " in l for l in periodic)
    assert "loss=" in periodic[-1] and last.startswith("epoch 1/3: done, 20/20 steps in ")
    gaps = [b - a for a, b in zip(out.times, out.times[1:-1])]  # between periodic lines
    assert all(g >= every * 0.9 for g in gaps), gaps
    assert len(periodic) <= took / every + 1


def test_short_work_prints_nothing_and_disabled_bars_are_silent():
    out = Recorder()
    with progress.LogBar(5, "quick", every=5.0, stream=out) as b:
        b.update(5)
    assert out.getvalue() == ""
    with progress.bar(5, "off", enabled=False, stream=out) as b:
        b.update(5)
    assert out.getvalue() == "" and isinstance(progress.bar(3, "x", stream=out), progress.LogBar)


def test_bar_is_tqdm_on_a_terminal_and_heartbeat_reports_elapsed_time():
    class Tty(Recorder):
        def isatty(self):
            return True

    from tqdm import tqdm

    b = progress.bar(3, "tty", stream=Tty())
    assert isinstance(b, tqdm)
    b.close()
    out = Recorder()
    os.environ[progress.INTERVAL_VAR] = "0.05"
    try:
        with progress.heartbeat("diagnose", stream=out):
            time.sleep(0.3)
    finally:
        del os.environ[progress.INTERVAL_VAR]
    text = out.getvalue().splitlines()
    assert text[0].startswith("diagnose: running, elapsed 0:0") and text[-1].startswith("diagnose: done in 0:0")


def test_train_and_final_evaluation_log_progress_when_stderr_is_a_file(tmp_path):
    """The whole command with stderr redirected to a file (as under nohup): epoch step lines, epoch summaries with
    the run's ETA and the final evaluation's lines appear."""
    err = tmp_path / "err.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", progress.INTERVAL_VAR: "0.05",
           "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "certlab.cli", "train", "--dataset", "spheres", "--data", "d=10,n=1500,margin=0.5",
           "--model", "mlp", "--model-params", "hidden=[64,64]", "--objective", "certified", "--relaxation",
           "crown-ibp", "--norm", "l2", "--eps", "0.1", "--epochs", "2", "--batch-size", "10", "--val-n", "50",
           "--eval-certify", "crown", "--eval-attacks", "apgd-ce", "--out", str(tmp_path / "run")]
    with open(err, "w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, env=env, timeout=300)
    text = err.read_text()
    assert p.returncode == 0, text[-2000:]
    lines = text.splitlines()
    steps = [l for l in lines if l.startswith("epoch 1/2: steps ")]
    assert steps and "ETA" in steps[0] and "loss=" in steps[-1], text[-2000:]
    assert any(l.startswith("epoch 2/2  loss") and "ETA 0:00" in l for l in lines)
    assert any(l.startswith("evaluate: ") for l in lines), text[-2000:]
    assert "\r" not in text  # no terminal bar redraws in a log file


# ---- train --resume ---------------------------------------------------------------------------------------------
def test_resume_reads_the_stored_config_and_extends_epochs(tmp_path, capsys):
    ref = tmp_path / "ref"
    from certlab.train import TrainConfig
    two = TrainConfig.from_dict(TINY).resolved().to_dict()  # an extended run keeps the schedule of its 2-epoch start
    train({**two, "epochs": 3}, ref, progress=False, evaluate=False)
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--no-progress", "--no-eval"]
    for k, v in {**TINY, "epochs": 2}.items():
        argv += ["--" + k.replace("_", "-"), ",".join(v) if isinstance(v, list) else
                 json.dumps(v) if not isinstance(v, str) else v]
    assert cli.main(argv) == 0
    capsys.readouterr()
    # only --out and --resume (and a longer --epochs): the rest comes from the run
    assert cli.main(["train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress", "--no-eval"]) == 0
    a, b = ckpt.load(ref / "last.pt"), ckpt.load(run / "last.pt")
    assert b["epoch"] == 3 and b["config"]["model_params"] == {"hidden": [16]}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # 2 + 1 epochs = 3 epochs in one go
    capsys.readouterr()
    # an option that contradicts the stored run: one line naming it and the stored value
    assert cli.main(["train", "--out", str(run), "--resume", "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr 0.5 (stored: 0.005)" in err, err
    assert cli.main(["train", "--out", str(run), "--resume", "--epochs", "1", "--no-progress"]) == 2
    assert "completed 3 epochs" in capsys.readouterr().err
    # the same value as stored is fine
    assert cli.main(["train", "--out", str(run), "--resume", "--lr", "0.005", "--no-progress", "--no-eval"]) == 0


# ---- leftovers --------------------------------------------------------------------------------------------------
def test_failed_run_leaves_no_empty_out_folder(tmp_path, monkeypatch):
    import certlab.train.loop as loop

    def boom(*a, **k):
        raise CertlabError("no data here")

    monkeypatch.setattr(loop, "load_data", boom)
    out = tmp_path / "new"
    with pytest.raises(CertlabError, match="no data"):
        train(TINY, out, progress=False)
    assert not out.exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    (kept / "notes.txt").write_text("x")
    with pytest.raises(CertlabError):
        train(TINY, kept, progress=False)
    assert sorted(os.listdir(kept)) == ["notes.txt"]  # a folder the user made stays, with only their files


def test_corrupt_checkpoint_message_is_one_complete_line_naming_the_file(tmp_path):
    run = tmp_path / "run"
    train(TINY, run, progress=False, evaluate=False)
    data = (run / "last.pt").read_bytes()
    for name, blob in (("trunc.pt", data[: len(data) // 2]), ("noise.pt", os.urandom(3000)), ("zero.pt", b"")):
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(CheckpointError) as e:
            ckpt.load(p)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and str(p) in msg and msg.endswith(")"), msg
        assert "corrupt, truncated or not a certlab checkpoint" in msg
    # a checkpoint whose weights do not fit its model
    state = ckpt.load(run / "last.pt")
    state["model"] = {k: v[:1] for k, v in state["model"].items()}
    ckpt.save(run / "best.pt", {k: v for k, v in state.items() if k != "format"})
    from certlab.train import load_run

    with pytest.raises(CheckpointError) as e:
        load_run(run, "best")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(run / "best.pt") in msg and msg.endswith(")"), msg


# ---- certify / help ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("ux") / "run"
    train(TINY, run, progress=False, evaluate=False)
    return run


def test_certify_suggests_every_method_and_refuses_n_zero(run_dir, capsys):
    assert cli.main(["certify", str(run_dir), "--method", "bap", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"did you mean [^)]*\bbab\b", err)
    assert all(m in err for m in ("bab", "milp", "lp", "ibp", "crown", "alpha-crown")), err
    assert cli.main(["certify", str(run_dir), "--n", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--n must be a positive integer" in err and not list(run_dir.glob("certify_*"))
    assert cli.main(["certify", str(run_dir), "--n", "3", "--method", "ibp", "--no-progress"]) == 0
    named = capsys.readouterr().out.strip().splitlines()[-1].split("results: ")[1]
    assert os.path.isfile(named)  # the file it names exists
    assert stat.S_IMODE(os.stat(named).st_mode) == 0o666 & ~_umask()


def _umask():
    old = os.umask(0o022)
    os.umask(old)
    return old


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_every_option_has_real_help():
    subs = _subparsers()
    assert {"train", "evaluate", "certify", "diagnose", "export"} <= set(subs)
    for name in subs:
        for a in subs[name]._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            h = (a.help or "").strip()
            assert h and h.replace(" ", "_").split(" (default")[0] != a.dest, (name, a.dest, h)
            assert h.count("(default") <= 1, (name, a.dest, h)
    text = subs["train"].format_help()
    assert "(default: eps) (default: None)" not in text and "none: eps" in text
    assert "stored" in text  # --resume explains that the run's stored configuration is used
    from certlab.train.cli import HELP
    from certlab.train.config import TrainConfig

    assert set(TrainConfig.fields()) <= set(HELP)  # a new config field needs its help line
    diag = subs["diagnose"].format_help()
    for column in ("width", "LP gap", "certified", "unstable", "1/gap", "continuous", "relu jump", "loss jump",
                   "sensitive", "relu curv"):
        assert f"\n  {column} " in diag, column


# ---- report files -----------------------------------------------------------------------------------------------
def test_fileio_mkstemp_gives_ordinary_permissions(tmp_path):
    from certlab.fileio import mkstemp

    old = os.umask(0o027)
    try:
        fd, p = mkstemp(dir=tmp_path)
        os.close(fd)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    finally:
        os.umask(old)
    fd, p = mkstemp(dir=tmp_path)
    os.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~old


# ---- demo -------------------------------------------------------------------------------------------------------
def test_demo_comparison_is_stored_for_the_report_and_reused(tmp_path, monkeypatch, capsys):
    from certlab import demo
    from certlab.experiments import report
    from certlab.train import compare as compare_mod

    rows = demo.compare(tmp_path, datasets=("spheres",), progress=True, epochs=1, val_n=20, eval_n=100)
    assert [r["name"] for r in rows["spheres"]] == ["standard", "pgd", "ibp"]
    printed = capsys.readouterr().out
    assert "spheres: training and evaluating pgd" in printed and "spheres: test errors" in printed
    assert report.read_compare(tmp_path) == rows  # what the report's first section shows

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(compare_mod, "quick_compare", no_training)
    monkeypatch.setattr("certlab.train.quick_compare", no_training)
    again = demo.compare(tmp_path, datasets=("spheres",), progress=True, epochs=1, val_n=20, eval_n=100)
    assert again == rows and "delete it to retrain" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="trained again"):  # other settings: trained again
        demo.compare(tmp_path, datasets=("spheres",), progress=False, epochs=2, val_n=20, eval_n=100)
