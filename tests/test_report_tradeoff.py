"""Paper 3 (ACERT) reporting: the radius search's cost per epoch in the training history, and the trade-off
report (one curve per method through its knob sweep, mean ± s.e. over seeds, x = ACR or certified accuracy)."""

import json
import os
import sqlite3
import time

import pytest

from certlab.experiments import report, store
from certlab.train import train


# ---- the radius search's cost -----------------------------------------------------------------------------
def test_adaptive_history_records_radius_search_time_and_bound_evaluations(tmp_path, monkeypatch):
    """Every batched bound evaluation of the search is counted (checked against a spy on the bound call), and its
    wall time is measured (the spy sleeps 5 ms a call, so the recorded time must be at least that much)."""
    from certlab.verify import radius as radius_mod

    calls = {"n": 0, "samples": 0}
    real = radius_mod.margins

    def spy(model, x, *a, **k):
        calls["n"] += 1
        calls["samples"] += x.shape[0]
        time.sleep(0.005)
        return real(model, x, *a, **k)

    monkeypatch.setattr(radius_mod, "margins", spy)
    summary = train({"dataset": "linsep", "data": {"d": 4, "n": 40}, "model": "mlp", "model_params": {"hidden": [8]},
                     "objective": "adaptive", "relaxation": "ibp", "eps": 0.2, "epochs": 2, "batch_size": 20,
                     "eps_start_epoch": 1, "val_n": 10}, tmp_path / "r", progress=False, evaluate=False)
    rows = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["radius_evals"] == 0 and rows[0]["radius_time_s"] < 0.005  # ε = 0 in epoch 1: no search
    assert rows[1]["radius_evals"] == calls["n"] >= 2 * 2  # ≥ 2 evaluations (both bracket ends) per step
    assert rows[1]["radius_sample_evals"] == calls["samples"] >= 2 * 40
    assert 0.005 * calls["n"] <= rows[1]["radius_time_s"] <= rows[1]["time_s"]
    assert summary["last"]["radius_evals"] == calls["n"]  # the epoch summary carries it too


def test_certified_history_has_no_radius_fields(tmp_path):
    train({"dataset": "linsep", "data": {"d": 4, "n": 40}, "model": "mlp", "model_params": {"hidden": [8]},
           "objective": "certified", "relaxation": "ibp", "eps": 0.2, "epochs": 1, "batch_size": 20, "val_n": 10},
          tmp_path / "c", progress=False, evaluate=False)
    row = json.loads(open(tmp_path / "c" / "metrics.jsonl").readline())
    assert not any(k.startswith("radius_") for k in row)


# ---- the trade-off report from a fake results database ----------------------------------------------------
FAKE = '''
def run(config, run_dir):
    """Metrics that depend on the method, its knob and the seed; ACERT cells record a radius search."""
    obj, seed = config["objective"], config["seed"]
    knob = {"adaptive": config["kappa_end"], "certified": config["kappa_end"], "sabr": config["sabr_lambda"],
            "mtl-ibp": config["cert_alpha"]}[obj]
    l2 = 0.02 if config["norm"] == "l2" else 0.0
    clean = 0.05 + 0.1 * (1 - knob) + 0.01 * seed + l2
    acr = 0.2 + 0.5 * (1 - knob) + 0.02 * seed
    hist = [{"epoch": 1, "time_s": 2.0}]
    if obj == "adaptive":
        hist = [{"epoch": 1, "time_s": 2.0, "radius_time_s": 0.0, "radius_evals": 0},
                {"epoch": 2, "time_s": 4.0, "radius_time_s": 1.0 + 0.1 * seed, "radius_evals": 50},
                {"epoch": 3, "time_s": 4.0, "radius_time_s": 1.0 + 0.1 * seed, "radius_evals": 70}]
    hist[-1].update(val_robust_error=0.5 - 0.1 * knob + 0.01 * seed, val_clean_error=clean)
    return {"metrics": {"clean_error": clean, "robust_error": None,
                        "certified_error": {"ibp": 1 - acr + 0.1, "crown": 1 - acr, "train": 1 - acr + 0.1},
                        "acr": {"ibp": acr, "train": acr}, "unstable_relus": 3.0, "time_train_s": 1.0,
                        "time_eval_s": 0.1},
            "history": hist}
'''

METHODS = {"adaptive": ("kappa_end", [0.0, 0.5]), "certified": ("kappa_end", [0.0, 0.5, 0.9]),
           "sabr": ("sabr_lambda", [0.2, 0.6]), "mtl-ibp": ("cert_alpha", [0.3, 0.7])}


def _spec():
    z = {"objective": [], "kappa_start": [], "kappa_end": [], "sabr_lambda": [], "cert_alpha": []}
    for obj, (key, vals) in METHODS.items():
        for v in vals:
            row = {"kappa_start": 0.0, "kappa_end": 0.0, "sabr_lambda": 0.4, "cert_alpha": 0.5, key: v}
            if key == "kappa_end":
                row["kappa_start"] = v
            z["objective"].append(obj)
            for k in row:
                z[k].append(row[k])
    return {"name": "trade", "cell_fn": "fakecell3:run", "base": {"relaxation": "ibp", "eps": 0.4, "val_split": 100},
            "grid": {"norm": ["linf", "l2"], "seed": [0, 1, 2]}, "zip": [z]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One sweep of the fake cell (54 cells) shared by the tests of this module."""
    from certlab.experiments import runner
    tmp = tmp_path_factory.mktemp("tradeoff")
    mod = tmp / "mods"
    mod.mkdir()
    (mod / "fakecell3.py").write_text(FAKE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(mod))
        mp.setenv("PYTHONPATH", str(mod) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        s = runner.run_sweep(_spec(), tmp / "sweep", jobs=1, progress=False)
    assert s["finished"] == 2 * 3 * 9
    return tmp / "sweep"


def _label(obj):
    return report.method_label({"objective": obj, "relaxation": "ibp"})


def test_tradeoff_axes_points_and_knob_labels(sweep):
    with store.Store(sweep, readonly=True) as st:
        cells = st.cells("trade")
        spec = st.experiments()[0]["spec"]
    knobs, panels = report.tradeoff_axes(spec, cells)
    assert set(knobs) == {"kappa_start", "kappa_end", "sabr_lambda", "cert_alpha"} and panels == ("norm",)
    pts = report.tradeoff_points(cells, knobs, panels)
    linf = (("norm", "linf"),)
    mine = {k[1:]: v for k, v in pts.items() if k[0] == linf}
    # one curve per method through its own knob only (SABR's points differ in λ, not in the κ it does not sweep)
    assert {m for m, _ in mine} == {_label(o) for o in METHODS} and len(mine) == 9
    assert {report.knob_text(kv) for m, kv in mine if m == _label("sabr")} == {"λ=0.2", "λ=0.6"}
    assert {report.knob_text(kv) for m, kv in mine if m == _label("adaptive")} == {"κ=0", "κ=0.5"}
    assert report.knob_text((("kappa_start", 1.0), ("kappa_end", 0.5))) == "κ₀=1, κ=0.5"
    # mean ± s.e. over the three seeds, computed independently from the database
    con = sqlite3.connect(store.db_path(sweep))
    vals = [r[0] for r in con.execute(
        "SELECT m.value FROM metrics m JOIN cells c ON c.id = m.cell_id WHERE m.key = 'acr.ibp' AND "
        "json_extract(c.config_json, '$.objective') = 'sabr' AND json_extract(c.config_json, '$.sabr_lambda') = 0.6 "
        "AND json_extract(c.config_json, '$.norm') = 'linf'")]
    con.close()
    assert len(vals) == 3
    m, se, n = mine[(_label("sabr"), (("sabr_lambda", 0.6),))]["acr.ibp"]
    mean = sum(vals) / 3
    assert m == pytest.approx(mean) and n == 3
    assert se == pytest.approx((sum((v - mean) ** 2 for v in vals) / 2) ** 0.5 / 3 ** 0.5)
    assert report.tradeoff_metrics(pts, linf) == ("acr.ibp", "certified_error.crown")  # IBP radii; strongest cert.
    # ACERT's radius search: epochs 2 and 3 only (epoch 1 had none); seed s: (1 + 0.1 s) s of 4 s per epoch
    ac = mine[(_label("adaptive"), (("kappa_start", 0.5), ("kappa_end", 0.5)))]
    assert ac["cost.radius_s"][0] == pytest.approx(1.1) and ac["cost.radius_share"][0] == pytest.approx(1.1 / 4)
    assert ac["cost.radius_evals"][0] == pytest.approx(60) and ac["cost.epoch_s"][0] == pytest.approx(4.0)
    assert mine[(_label("sabr"), (("sabr_lambda", 0.6),))]["cost.radius_s"][0] is None


def test_tradeoff_report_tables_and_figures(sweep, monkeypatch):
    figs = {}
    real_save = report._save

    def save(fig, path):
        figs[os.path.basename(path)] = fig
        real_save(fig, path)

    monkeypatch.setattr(report, "_save", save)
    monkeypatch.setattr(report._plt(), "close", lambda fig: None)
    md = report.write_report(sweep, sweep.parent / "rep")
    text = open(md).read()
    names = sorted(os.listdir(os.path.join(os.path.dirname(md), "figures")))
    for panel in ("linf", "l2"):
        assert f"trade-norm-{panel}-tradeoff.png" in names and f"trade-norm-{panel}-tradeoff-cert.png" in names
    assert "### norm=linf" in text and "### norm=l2" in text
    assert "ACR % of ε (IBP)" in text and "cert. err % CROWN" in text
    sabr_row = next(l for l in text.splitlines() if l.startswith(f"| {_label('sabr')} | λ=0.6 | 3 |"))
    assert sabr_row.count("±") >= 3
    # CTBench's choice: per method the knob with the lowest validation certified error (here the largest knob)
    sel = text.split("Knob selected on validation")[1].split("\n\n")[1].splitlines()[2:]
    assert "held out from training" in text
    assert {tuple(c.strip() for c in l.split("|")[1:3]) for l in sel} == {
        (_label("adaptive"), "κ=0.5"), (_label("certified"), "κ=0.9"), (_label("sabr"), "λ=0.6"),
        (_label("mtl-ibp"), "α=0.7")}
    assert "radius search s / epoch" in text
    cost_rows = [l for l in text.split("radius search s / epoch")[1].split("\n\n")[0].splitlines()[2:]]
    assert cost_rows and all(l.startswith(f"| {_label('adaptive')} |") for l in cost_rows)
    assert "| 1.1 ± 0.058 | 27.5 ± 1.4 | 60 ± 0 | 4 ± 0 |" in text  # κ=0.5 row: seeds 0,1,2 -> 1.0, 1.1, 1.2 s
    # the ACR figure: one errorbar curve per method, points in knob order, knob values written next to the points
    ax = figs["trade-norm-linf-tradeoff.png"].axes[0]
    curves = {c.get_label(): c for c in ax.containers}
    assert set(curves) == {_label(o) for o in METHODS}
    cert_curve = curves[_label("certified")].lines[0]
    assert len(cert_curve.get_xdata()) == 3
    # certified κ = 0, 0.5, 0.9: ACR 0.7, 0.45, 0.25 (+ 0.02 seed mean) -> x in %, in knob order
    assert list(cert_curve.get_xdata()) == pytest.approx([72.0, 47.0, 27.0])
    assert list(cert_curve.get_ydata()) == pytest.approx([84.0, 89.0, 93.0])
    assert {"λ=0.2", "λ=0.6", "α=0.3", "α=0.7", "κ=0.9"} <= {t.get_text() for t in ax.texts}
    assert "ACR" in ax.get_xlabel() and "IBP" in ax.get_xlabel()
    ax2 = figs["trade-norm-linf-tradeoff-cert.png"].axes[0]
    assert "CROWN" in ax2.get_xlabel() and "0.4" in ax2.get_xlabel()
    xs = ax2.containers[0].lines[0].get_xdata()
    assert all(0 <= v <= 100 for v in xs)


def test_selection_keeps_a_method_with_one_knob_value_and_needs_a_choice():
    """A method trained at one knob value (plain IBP in a CTBench table) stays in the selected table; a file where no
    method has several knob values has no selection to show."""
    pts = {("p", "sabr", (("sabr_lambda", 0.2),)): {"val.robust_error": (0.3,), "val.clean_error": (0.1,)},
           ("p", "sabr", (("sabr_lambda", 0.6),)): {"val.robust_error": (0.2,), "val.clean_error": (0.1,)},
           ("p", "IBP", ()): {"val.robust_error": (0.25,), "val.clean_error": (0.1,)},
           ("p", "AT", ()): {"val.clean_error": (0.1,)}}  # no validation certified/robust error: left out
    chosen = report.select_on_validation(pts, list(pts))
    assert sorted(chosen) == sorted([("p", "sabr", (("sabr_lambda", 0.6),)), ("p", "IBP", ())])
    single = {k: v for k, v in pts.items() if k[1] != "sabr"}
    assert report.select_on_validation(single, list(single)) == []
