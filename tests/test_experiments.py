"""certlab.experiments: grid expansion, the results store, kill-and-resume of a sweep, reports, CLI.

Sweeps here run a tiny fake cell function (written to a temp module) so they take seconds; one test runs a real
cell (certlab.train on a few spheres points) when the training module is available.
"""

import json
import os
import signal
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from certlab.errors import CertlabError
from certlab.experiments import grid, report, runner, store

FAKE = textwrap.dedent('''
    import json, os, time, random

    def run(config, run_dir):
        """Deterministic fake metrics; logs start/end lines to config['log'] (append, one line each)."""
        with open(config["log"], "a") as f:
            f.write(f"start {os.path.basename(run_dir)}\\n")
        time.sleep(config.get("sleep", 0.0))
        if config.get("crash_once") and not os.path.exists(os.path.join(run_dir, "crashed")):
            open(os.path.join(run_dir, "crashed"), "w").close()
            raise RuntimeError("boom (first attempt)")
        rng = random.Random(config.get("seed", 0) * 7919 + int(config.get("k", 1)))
        k, cert = config.get("k", 1), config.get("objective") == "certified"
        clean = 0.05 + (0.04 * k if cert else 0.01 * k) + 0.01 * rng.random()
        robust = clean + (0.08 * k if cert else 0.03 * k)
        hist = [{"epoch": e + 1, "unstable_relus": 10.0 / (e + 1) + k} for e in range(3)]
        with open(config["log"], "a") as f:
            f.write(f"end {os.path.basename(run_dir)}\\n")
        return {"metrics": {"clean_error": clean, "robust_error": robust,
                            "certified_error": {"ibp": robust + 0.1, "train": robust + 0.1},
                            "acr": {"ibp": max(0.0, 0.8 - robust), "train": max(0.0, 0.8 - robust)},
                            "unstable_relus": 5.0 + k, "time_train_s": 0.1, "time_eval_s": 0.05},
                "history": hist}
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "fakecell.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(mod))
    monkeypatch.setenv("PYTHONPATH", str(mod) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path


def spec(log, **over):
    d = {"name": "toy", "cell_fn": "fakecell:run",
         "base": {"dataset": "spheres", "data": {"d": 10, "margin": 20}, "objective": "pgd", "log": str(log)},
         "grid": {"objective": ["pgd", "certified"], "k": [1, 2, 3], "seed": [0, 1]}}
    d.update(over)
    return d


# ---- grid -------------------------------------------------------------------------------------------------
def test_grid_cartesian_zip_exclude_and_stable_ids():
    torch.manual_seed(0)
    exp = grid.from_dict({"name": "g", "base": {"a": 1, "data": {"margin": 20}},
                          "grid": {"k": [1, 2, 3], "seed": [0, 1]},
                          "zip": [{"objective": ["pgd", "certified"], "relaxation": ["crown", "ibp"]}],
                          "exclude": [{"objective": "pgd", "k": 3}]})
    cells = exp.cells()
    assert len(cells) == 3 * 2 * 2 - 2
    assert all(not (c.params["objective"] == "pgd" and c.params["k"] == 3) for c in cells)
    assert {(c.params["objective"], c.params["relaxation"]) for c in cells} == {("pgd", "crown"), ("certified", "ibp")}
    assert len({c.id for c in cells}) == len(cells)
    c0 = cells[0]
    assert c0.config["data"] == {"margin": 20} and c0.config["a"] == 1 and c0.config["k"] == 1
    # the id is a hash of the resolved config only: independent of key order and of the expansion
    again = grid.from_dict({"name": "other", "base": {"data": {"margin": 20}, "a": 1},
                            "grid": {"seed": [1, 0], "k": [3, 2, 1]},
                            "zip": [{"relaxation": ["crown", "ibp"], "objective": ["pgd", "certified"]}],
                            "exclude": [{"k": 3, "objective": "pgd"}]}).cells()
    assert {c.id for c in again} == {c.id for c in cells}
    assert grid.cell_id({"b": 2, "a": [1, 2]}) == grid.cell_id({"a": [1, 2], "b": 2})
    assert grid.cell_id({"a": 1}) != grid.cell_id({"a": 2})


def test_grid_dotted_keys_and_bad_specs():
    exp = grid.from_dict({"name": "m", "base": {"data": {"d": 10}}, "grid": {"data.margin": [20, 10]}})
    assert [c.config["data"] for c in exp.cells()] == [{"d": 10, "margin": 20}, {"d": 10, "margin": 10}]
    bad = [
        {"base": {}},                                                   # no name
        {"name": "x", "grid": {"k": []}},                               # empty axis
        {"name": "x", "grid": {"k": 3}},                                # not a list
        {"name": "x", "zip": [{"a": [1, 2], "b": [1]}]},               # zip lengths differ
        {"name": "x", "grid": {"a": [1]}, "zip": [{"a": [1]}]},        # key in two axes
        {"name": "x", "grid": {"a": [1]}, "exclude": [{"b": 1}]},      # exclude on a non-axis
        {"name": "x", "grdi": {}},                                      # typo at top level
        {"name": "bad name!"},
    ]
    for b in bad:
        with pytest.raises(CertlabError):
            grid.from_dict(b)


def test_load_all_multi_document(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("name: a\nbase: {x: 1}\ngrid: {k: [1, 2]}\n---\nname: b\nbase: {x: 2}\n")
    exps = grid.load_all(p)
    assert [e.name for e in exps] == ["a", "b"] and len(exps[0].cells()) == 2 and len(exps[1].cells()) == 1
    with pytest.raises(CertlabError):
        grid.load(p)
    p.write_text("name: a\ncell_fn: m:f\nbase: {x: 1, d: {u: 1}}\n---\nname: b\nextends: a\nbase: {d: {v: 2}}\n"
                 "---\nname: c\nextends: a\ncell_fn: m:g\n")
    a, b, c = grid.load_all(p)
    assert b.base == {"x": 1, "d": {"u": 1, "v": 2}} and b.cell_fn == "m:f"  # extends inherits the cell function
    assert c.cell_fn == "m:g"
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(CertlabError, match="not valid YAML"):
        grid.load_all(tmp_path / "bad.yaml")
    with pytest.raises(CertlabError, match="not found"):
        grid.load_all(tmp_path / "missing.yaml")


# ---- store ------------------------------------------------------------------------------------------------
def test_store_idempotent_and_transitions(tmp_path):
    exp = grid.from_dict(spec("log"))
    cells = exp.cells()
    with store.Store(tmp_path) as st:
        assert st.add_experiment(exp, cells) == len(cells)
        assert st.add_experiment(exp, cells) == 0            # adding again inserts nothing
        st.claim(cells[0].id)
        with pytest.raises(CertlabError):
            st.claim(cells[0].id)                             # already running
        st.finish(cells[0].id, {"metrics": {"clean_error": 0.1, "certified_error": {"ibp": 0.3}, "x": None}})
        with pytest.raises(CertlabError):
            st.finish(cells[0].id, {"metrics": {}})           # not running any more
        st.add_experiment(exp, cells)                         # re-adding keeps results
        c = st.cell(cells[0].id)
        assert c["status"] == "finished" and c["attempts"] == 1
        assert st.cells("toy", "finished")[0]["metrics"] == {"clean_error": 0.1, "certified_error.ibp": 0.3}
        st.claim(cells[1].id)
        assert st.recover_interrupted() == [cells[1].id]
        assert st.cell(cells[1].id)["status"] == "failed"
        assert st.status_counts("toy") == {"pending": len(cells) - 2, "running": 0, "finished": 1, "failed": 1}
    con = sqlite3.connect(store.db_path(tmp_path))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM cells").fetchone() == (len(cells), len(cells))
    con.close()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / store.DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CertlabError):
        store.Store(tmp_path / "junk")
    with pytest.raises(CertlabError, match="no results database"):
        store.Store(tmp_path / "nothing", readonly=True)


# ---- sweeps -----------------------------------------------------------------------------------------------
def _log_counts(log):
    starts, ends = {}, {}
    for line in open(log).read().split("\n"):
        if line:
            kind, cid = line.split()
            (starts if kind == "start" else ends)[cid] = (starts if kind == "start" else ends).get(cid, 0) + 1
    return starts, ends


def test_sweep_runs_skips_and_retries_failed(fake):
    log = fake / "log.txt"
    out = fake / "sweep"
    exp = spec(log, grid={"objective": ["pgd", "certified"], "k": [1, 2]}, base={
        "objective": "pgd", "log": str(log), "crash_once": True})
    s = runner.run_sweep(exp, out, jobs=2, progress=False)
    assert s["cells"] == 4 and s["failed"] == 4 and s["finished"] == 0     # every first attempt crashes
    with store.Store(out, readonly=True) as st:
        assert all("boom" in c["error"] for c in st.cells("toy"))
    s = runner.run_sweep(exp, out, jobs=2, progress=False)               # failed cells are retried
    assert s["finished"] == 4 and s["ran"] == 4
    s = runner.run_sweep(exp, out, jobs=2, progress=False)               # nothing left to do
    assert s["ran"] == 0 and s["skipped"] == 4
    starts, ends = _log_counts(log)
    assert set(starts.values()) == {2} and set(ends.values()) == {1}
    with store.Store(out, readonly=True) as st:
        assert all(c["attempts"] == 2 for c in st.cells("toy"))


def test_sweep_killed_and_resumed_runs_each_cell_once(fake):
    """Kill a sweep (SIGKILL, no cleanup) mid-way; the restart runs only unfinished cells; every cell is in the
    database exactly once and finished exactly once."""
    log = fake / "log.txt"
    out = fake / "sweep"
    path = fake / "toy.yaml"
    import yaml
    path.write_text(yaml.safe_dump(spec(log, base={"objective": "pgd", "log": str(log), "sleep": 0.7})))
    cmd = [sys.executable, "-m", "certlab.cli", "sweep", str(path), "--out", str(out), "--jobs", "2", "-q"]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    deadline = time.time() + 150  # generous: the CLI's start (torch import) is slow on a loaded machine
    done = 0
    while time.time() < deadline:
        time.sleep(0.1)
        if os.path.exists(store.db_path(out)):
            try:
                con = sqlite3.connect(store.db_path(out), timeout=5)
                done = con.execute("SELECT COUNT(*) FROM cells WHERE status='finished'").fetchone()[0]
                con.close()
            except sqlite3.OperationalError:
                continue
            if done >= 3:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= done < 12, "the sweep should be killed part-way"
    with store.Store(out, readonly=True) as st:
        before = {c["id"]: c["status"] for c in st.cells("toy")}
    finished_before = {k for k, v in before.items() if v == "finished"}
    assert any(v == "running" for v in before.values())  # killed while cells were running
    time.sleep(0.8)  # orphaned workers (if any survived) would write now
    assert subprocess.run(cmd, env=os.environ.copy()).returncode == 0
    with store.Store(out, readonly=True) as st:
        cells = st.cells("toy")
        assert len(cells) == 12 and all(c["status"] == "finished" for c in cells)
    con = sqlite3.connect(store.db_path(out))
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM cells").fetchone() == (12, 12)
    con.close()
    starts, ends = _log_counts(log)
    assert set(ends) == {c["id"] for c in cells}                                   # every cell's work completed
    assert all(starts[c] == 1 and ends[c] == 1 for c in finished_before)           # finished ones not rerun
    # a cell that was running at the kill may have completed its work just before the kill, yet not been recorded
    # as finished: it is run again (at-least-once), but never more than that, and the database holds it once
    assert all(ends[c] <= 2 and starts[c] <= 2 for c in ends if c not in finished_before)
    assert sum(ends[c] - 1 for c in ends) <= sum(v == "running" for v in before.values())


def test_concurrent_sweep_refused_and_ray_errors(fake):
    out = fake / "sweep"
    out.mkdir()
    with runner._DirLock(str(out)):
        with pytest.raises(CertlabError, match="another certlab sweep"):
            runner.run_sweep(spec(fake / "log"), out, progress=False)
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(CertlabError, match="ray"):
            runner.run_sweep(spec(fake / "log"), out, launcher="ray", progress=False)
    with pytest.raises(CertlabError):
        runner.run_sweep(spec(fake / "log"), out, jobs=0, progress=False)


def test_ray_launcher_on_local_instance(fake):
    ray = pytest.importorskip("ray", reason="ray is not installed here (optional extra certlab[ray])")
    out = fake / "ray"
    exp = spec(fake / "log", grid={"objective": ["pgd", "certified"], "k": [1, 2]})
    try:
        s = runner.run_sweep(exp, out, jobs=2, launcher="ray", progress=False, threads=1)
    finally:
        ray.shutdown()
    assert s["finished"] == 4 and s["ran_ok"] == 4
    with store.Store(out, readonly=True) as st:
        assert all(c["metrics"]["clean_error"] > 0 for c in st.cells("toy"))
    _, ends = _log_counts(fake / "log")
    assert set(ends.values()) == {1} and len(ends) == 4


# ---- report -----------------------------------------------------------------------------------------------
def test_report_from_synthetic_database(fake, tmp_path):
    out = tmp_path / "sweep"
    runner.run_sweep(spec(fake / "log"), out, jobs=2, progress=False)
    md = report.write_report(out)
    text = open(md).read()
    html = open(os.path.join(os.path.dirname(md), "report.html")).read()
    figs = os.listdir(os.path.join(os.path.dirname(md), "figures"))
    assert "Experiment toy" in text and "<table>" in html and "<img" in html
    assert any(f.endswith("-vs-k.png") for f in figs) and any("tradeoff" in f for f in figs)
    assert any("unstable" in f for f in figs)
    for f in figs:
        with open(os.path.join(os.path.dirname(md), "figures", f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # mean ± s.e. over the two seeds of (certified, k=2), computed independently from the database
    con = sqlite3.connect(store.db_path(out))
    vals = [r[0] for r in con.execute(
        "SELECT m.value FROM metrics m JOIN cells c ON c.id=m.cell_id WHERE m.key='clean_error' AND "
        "json_extract(c.config_json,'$.objective')='certified' AND json_extract(c.config_json,'$.k')=2")]
    con.close()
    assert len(vals) == 2
    mean, se = sum(vals) / 2, abs(vals[0] - vals[1]) / 2
    assert f"| 2 | IBP | 2 | {mean * 100:.1f} ± {se * 100:.1f} |" in text or \
           f"| 2 | certified (ibp) |" in text or f"{mean * 100:.1f} ± {se * 100:.1f}" in text
    assert "IBP has the higher robust error at 3 of 3 values of k" in text or \
        re.search(r"has the higher robust error at 3 of 3 values of k", text)
    # the gap is named at both ends of the axis, so the direction of the trend reads the right way round
    assert re.search(r"the gap goes from \+\d+\.\d points at k = 1 to \+\d+\.\d points at k = 3: a rise of \d+\.\d "
                     r"points; it rose at 2 of the 2 steps", text)
    assert "steps up" not in text and "(flat;" not in text
    # files readable like any other file the package writes (not mkstemp's 0600)
    mask = os.umask(0o022)
    os.umask(mask)
    for f in ["report.md", "report.html"] + [os.path.join("figures", g) for g in figs]:
        assert stat.S_IMODE(os.stat(os.path.join(os.path.dirname(md), f)).st_mode) == 0o666 & ~mask, f
    assert not os.path.exists(os.path.join(out, runner.LOCK_NAME))  # the sweep removed its lock file


def test_unstable_figure_has_one_subplot_per_value_of_its_own_panel(fake, tmp_path):
    import struct
    out = tmp_path / "sweep"
    sp = spec(fake / "log", grid={"objective": ["pgd", "certified"], "seed": [0]},
              zip=[{"norm": ["linf", "linf", "l2"], "eps": [0.1, 0.2, 0.5]}])
    runner.run_sweep(sp, out, jobs=1, progress=False)
    fig_dir = os.path.join(os.path.dirname(report.write_report(out)), "figures")
    unstable = sorted(f for f in os.listdir(fig_dir) if "unstable" in f)
    assert any("l2" in f for f in unstable) and any("linf" in f for f in unstable)

    def width(name):
        with open(os.path.join(fig_dir, name), "rb") as fh:
            return struct.unpack(">I", fh.read(24)[16:20])[0]
    w = {("l2" if "l2" in f else "linf"): width(f) for f in unstable}
    assert w["l2"] < w["linf"]  # l2 has one eps value (one subplot), l_inf two — not the union of both panels


def test_cli_dry_run_and_report(fake, tmp_path, capsys):
    from certlab.cli import main
    import yaml
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump(spec(fake / "log")))
    assert main(["sweep", str(p), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 cells" in out and out.count(" new ") == 12
    assert not os.path.exists(tmp_path / "o" / store.DB_NAME)      # a dry run writes nothing
    assert main(["report", str(tmp_path / "nothing")]) == 2        # CertlabError -> exit code 2


def test_cli_only_selects_documents(fake, tmp_path, capsys):
    from certlab.cli import main
    import yaml
    first = spec(fake / "log")
    second = dict(first, name="other", grid={"x": [1, 2]})
    second.pop("zip", None)
    p = tmp_path / "two.yaml"
    p.write_text(yaml.safe_dump(first) + "---\n" + yaml.safe_dump(second))
    assert main(["sweep", str(p), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    both = capsys.readouterr().out
    assert f"experiment {first['name']}: 12 cells" in both and "experiment other: 2 cells" in both
    assert main(["sweep", str(p), "--out", str(tmp_path / "o"), "--only", "other", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "experiment other: 2 cells" in out and f"experiment {first['name']}" not in out
    assert main(["sweep", str(p), "--out", str(tmp_path / "o"), "--only", "nope", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no document named nope" in err and "other" in err


# ---- one real cell --------------------------------------------------------------------------------------
def test_real_cell_spheres(tmp_path):
    pytest.importorskip("certlab.train")
    torch.manual_seed(0)
    exp = {"name": "real", "base": {"dataset": "spheres", "data": {"d": 5, "n": 64, "n_test": 64, "r0": 5.0,
                                                                  "margin": 4.0},
                                    "model": "mlp", "model_params": {"hidden": [16]}, "norm": "l2", "eps": 0.5,
                                    "epochs": 1, "batch_size": 32, "lr": 0.01, "optimizer": "sgd",
                                    "eval_certify": ["ibp"], "eval_attacks": ["apgd-ce"], "val_n": 32},
           "grid": {"objective": ["pgd", "certified"]}}
    s = runner.run_sweep(exp, tmp_path / "s", jobs=1, progress=False, threads=1)
    with store.Store(tmp_path / "s", readonly=True) as st:
        cells = st.cells("real")
        errs = [c["error"] for c in cells if c["error"]]
        assert s["finished"] == 2, errs
        for c in cells:
            m = c["metrics"]
            assert 0 <= m["clean_error"] <= 1 and 0 <= m["robust_error"] <= 1
            assert m["clean_error"] <= m["robust_error"] + 1e-9
            assert m["robust_error"] <= m["certified_error.ibp"] + 1e-9   # sound: certified ⇒ not attacked
            assert len(c["history"]) == 1
    raw = sqlite3.connect(store.db_path(tmp_path / "s")).execute("SELECT result_json FROM cells").fetchall()
    assert raw and not any(str(tmp_path) in r[0] for r in raw)    # paths stored relative to the sweep directory
    report_md = report.write_report(tmp_path / "s")
    assert str(tmp_path) not in open(report_md).read()


def test_report_axes_and_identical_axis_note():
    spec_ = {"grid": {"objective": ["pgd"], "seed": [0]},
             "zip": [{"kappa_start": [0.0, 0.5], "kappa_end": [0.0, 0.5]}, {"norm": ["linf", "l2"], "eps": [0.1, 1.0]}]}
    cells = [{"params": {"objective": "pgd", "seed": 0, "kappa_start": a, "kappa_end": a, "norm": n, "eps": e}}
             for a in (0.0, 0.5) for n, e in (("linf", 0.1), ("l2", 1.0))]
    x, panels = report.split_axes(spec_, cells)
    assert x == "kappa_start" and panels == ["norm", "eps"]   # kappa_end is tied to x, not a panel
    same = {((), "AT", xv): {"clean_error": (0.1, None, 1), "robust_error": (0.2, None, 1)} for xv in (1, 5)}
    assert "no effect" in report.identical_note(same, (), "k")
    same[((), "AT", 5)] = {"clean_error": (0.1, None, 1), "robust_error": (0.3, None, 1)}
    assert report.identical_note(same, (), "k") == ""
    assert report.fmt((0.1234, 0.01, 2)) == "12.3 ± 1.0" and report.fmt((0.5, None, 1)) == "50.0"
    assert report.mean_se([0.1, 0.3]) == (pytest.approx(0.2), pytest.approx(0.1), 2)


def test_figures_show_coincident_lines_and_share_y_ranges(monkeypatch, tmp_path):
    """Two methods with identical values are both visible (different markers and line styles, dodged in x) and
    named as coinciding; the error panels share one y range from 0; the unstable-ReLU axis has its unit."""
    agg = {}
    for xv in (1.0, 3.0, 5.0):
        for mth, ce in (("AT", 0.10), ("IBP", 0.30), ("Fast-Lin", 0.30)):
            agg[((), mth, xv)] = {"clean_error": (ce, None, 1), "robust_error": (ce + 0.02 * xv, None, 1),
                                  "certified_error.train": (0.9, None, 1), "unstable_relus": (20.0 + 0.1 * xv, None, 1)}
    series = {"IBP": [(1, 0.3), (3, 0.3)], "Fast-Lin": [(1, 0.3), (3, 0.3)], "AT": [(1, 0.1), (3, 0.1)]}
    assert report.coincident(series) == [("Fast-Lin", "IBP")]
    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig))
    monkeypatch.setattr(report._plt(), "close", lambda fig: None)
    report.figure_vs_x(agg, (), "eps", report.MAIN_METRICS, str(tmp_path / "f.png"), "t")
    axes = figs[0].axes
    assert [ax.get_ylim() for ax in axes[:3]] == [axes[0].get_ylim()] * 3 and axes[0].get_ylim()[0] == 0
    assert axes[0].get_ylim()[1] >= 90  # the certified-error panel's values set the shared range
    assert axes[3].get_ylim()[0] == 0 and "per sample" in axes[3].get_ylabel()  # 20 ± 0.2 does not fill the axis
    assert "IBP = Fast-Lin" in axes[0].get_title() or "Fast-Lin = IBP" in axes[0].get_title()
    data = [c.lines[0] for c in axes[0].containers]  # the data line of each method's errorbar
    assert len(data) == 3 and len({(l.get_marker(), l.get_linestyle()) for l in data}) == 3
    xs = {round(float(l.get_xdata()[0]), 6) for l in data}
    assert len(xs) == 3  # the three methods' first points sit at three dodged x positions


def test_report_acr_column_only_when_measured_and_demo_comparison_included(fake, tmp_path):
    out = tmp_path / "sweep"
    runner.run_sweep(spec(fake / "log"), out, jobs=2, progress=False)
    text = open(report.write_report(out)).read()
    assert "ACR % of ε" in text
    acr_rows = [l for l in text.splitlines() if l.startswith("| 1 | AT |")]
    assert acr_rows and "—" not in acr_rows[0]  # the fake cells measured ACR: the column is filled
    # a sweep whose cells did not measure ACR: no column of dashes, a sentence instead
    con = sqlite3.connect(store.db_path(out))
    con.execute("DELETE FROM metrics WHERE key LIKE 'acr.%'")
    con.commit()
    con.close()
    rows = [{"name": n, "clean_error": 0.1 * i, "robust_error": 0.2 * i, "certified_error": {"ibp": 0.3 * i},
             "unstable_relus": 1.5, "eps": 0.1, "norm": "linf", "model": "mlp", "n": 100}
            for i, n in enumerate(("standard", "pgd", "ibp"), 1)]
    (out / "compare.json").write_text(json.dumps({"digits": {"settings": {}, "rows": rows}}))
    text = open(report.write_report(out)).read()
    assert "ACR % of ε" not in text and "did not measure the average certified radius" in text
    assert "## Standard vs PGD vs IBP training on built-in data" in text
    assert "| PGD (AT) | 20.0 | 40.0 | 60.0 | 1.5 |" in text
    assert text.index("built-in data") < text.index("Experiment toy")  # the demo's first part comes first


def test_sweep_prints_status_lines_while_cells_run_and_removes_its_lock(fake, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CERTLAB_PROGRESS_INTERVAL", "0.2")
    out = tmp_path / "slow"
    sp = spec(fake / "log", grid={"objective": ["pgd", "certified"]})
    sp["base"]["sleep"] = 1.0
    runner.run_sweep(sp, out, jobs=1, progress=True)
    lines = capsys.readouterr().out.splitlines()
    status = [l for l in lines if l.strip().startswith("sweep: ")]
    assert status and any("0/2 cells done, 1 running" in l for l in status), lines
    assert any("1/2 cells done" in l and "ETA 0:0" in l for l in status), lines
    assert len(status) <= 2.5 / 0.2 + 1  # rate limited
    assert not (out / runner.LOCK_NAME).exists()
    with runner._DirLock(str(out)):  # and a new sweep can lock the folder again
        assert (out / runner.LOCK_NAME).exists()
    assert not (out / runner.LOCK_NAME).exists()


def test_cell_metric_summaries():
    from certlab.experiments import cell
    ev = {"n": 10, "clean_error": 0.1, "robust_error": 0.2, "certified_error": {"ibp": 0.5, "crown": 0.3},
          "acr": {"ibp": 0.2, "crown": 0.4}, "unstable_relus": 3.0}
    m = cell.summarize_eval(ev, {"relaxation": "ibp"})
    assert m["certified_error"] == {"ibp": 0.5, "crown": 0.3, "train": 0.5, "best": 0.3}
    assert m["acr"]["train"] == 0.2 and m["acr"]["best"] == 0.4
    flat = store.flatten_metrics(m)
    assert flat["certified_error.best"] == 0.3 and "acr.crown" in flat and flat["n"] == 10.0
    rows = [{"relaxation": "ibp", "width": 2.0, "lp_gap": None}, {"relaxation": "crown", "width": 1.0}]
    d = cell.diagnostics_metrics(rows, "crown")
    assert d["own"] == {"width": 1.0} and d["ibp"] == {"width": 2.0}


def test_every_shipped_experiment_file_loads_and_its_cells_are_valid_configs():
    """The study files users run: valid YAML, every document expands to cells, every cell a valid TrainConfig."""
    root = os.path.join(os.path.dirname(__file__), "..", "experiments")
    files = sorted(f for f in os.listdir(root) if f.endswith(".yaml"))
    assert len(files) >= 10
    for f in files:
        for exp in grid.load_all(os.path.join(root, f)):
            cells = grid.expand(exp)
            assert cells, f"{f}: {exp.name} has no cells"
            if grid.uses_train_config(exp):
                grid.validate_configs(cells)


def test_run_cell_crown_adds_crown_certificate_without_its_acr(tmp_path):
    from certlab.experiments.cell import run_cell_crown

    torch.manual_seed(0)
    cfg = {"dataset": "spheres", "data": {"d": 5, "n": 64, "n_test": 64, "r0": 5.0, "margin": 4.0},
           "model": "mlp", "model_params": {"hidden": [16]}, "norm": "l2", "eps": 0.5, "epochs": 1,
           "batch_size": 32, "lr": 0.01, "optimizer": "sgd", "objective": "certified", "relaxation": "ibp", "eval_certify": ["ibp"],
           "eval_acr": True, "eval_attacks": [], "val_n": 32}
    m = run_cell_crown(cfg, str(tmp_path / "c"))["metrics"]
    cert = m["certified_error"]
    assert set(m["acr"]) == {"ibp", "best", "train"}                   # no CROWN radius search
    assert cert["crown"] <= cert["ibp"] + 1e-9                          # CROWN is at least as tight as IBP here
    assert cert["best"] == min(cert["crown"], cert["ibp"]) and cert["train"] == cert["ibp"]
