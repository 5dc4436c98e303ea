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
