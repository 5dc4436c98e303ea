"""Relaxation diagnostics: orderings that theory guarantees, and the CLI table."""

import json

import pytest
import torch

import certlab
from nets import mlp
from certlab.errors import InputError
from certlab.verify import diagnostics


def _net(seed, widths=(4, 16, 16, 3), relu=True):
    return mlp(seed, widths, relu=relu)


def test_diagnose_orderings():
    torch.manual_seed(0)
    model = _net(0)
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    rows = diagnostics.diagnose(model, (x, y), certlab.LinfBall(0.05), ("ibp", "crown", "crown-ibp", "fastlin"),
                                n=16, lp_samples=3, grid=9)
    r = {row["relaxation"]: row for row in rows}
    assert set(r) == {"ibp", "crown", "crown-ibp", "fastlin"}
    for m in r:  # the triangle LP (CROWN∩IBP intermediates) is at least as tight as each of these
        assert r[m]["lp_gap"] >= -1e-4
        assert 0.0 <= r[m]["certified"] <= 1.0 and r[m]["max_slope"] >= 0 and r[m]["sensitivity"] >= 0
    assert r["ibp"]["width"] >= r["crown"]["width"] - 1e-6
    assert r["ibp"]["unstable"] >= r["crown"]["unstable"]
    assert r["crown-ibp"]["unstable"] == r["ibp"]["unstable"]  # both use IBP's intermediate bounds
    assert abs(r["ibp"]["sensitivity"] - 1.0) < 1e-6
    assert r["ibp"]["lp_gap"] > r["crown"]["lp_gap"]
    text = diagnostics.format_rows(rows, "t")
    assert "crown-ibp" in text and "LP gap" in text


def test_continuity_smooth_on_linear_network():
    """Without ReLUs the certified loss is smooth in the weights: no jump stands out."""
    model = _net(2, relu=False)
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    slope, ratio = diagnostics.continuity(model, x, y, certlab.LinfBall(0.05), "crown", grid=21)
    assert slope > 0 and ratio < 5
    with pytest.raises(InputError):
        diagnostics.continuity(model, x, y, certlab.LinfBall(0.05), "crown", grid=2)
    with pytest.raises(InputError):
        diagnostics.diagnose(model, (x, y), certlab.LinfBall(0.05), ("nope",))


def test_diagnose_and_certify_cli(tmp_path, capsys):
    from certlab.cli import main
    from certlab.train import TrainConfig, train

    cfg = TrainConfig(dataset="spheres", data={"d": 4, "n": 200}, model="mlp", model_params={"hidden": [12, 12]},
                      epochs=2, lr=0.01, eps=0.05, batch_size=50, eval_n=20, eval_attacks=[], eval_certify=["ibp"],
                      eval_acr=False)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    assert main(["diagnose", str(run), "--relaxations", "ibp,crown", "--n", "8", "--lp-samples", "2",
                 "--grid", "5", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "ibp" in out and "crown" in out and (tmp_path / "d.json").exists()
    res = tmp_path / "r.jsonl"
    assert main(["certify", str(run), "--method", "bab", "--eps", "0.05", "--n", "6", "--timeout", "5",
                 "--out", str(res), "--no-progress"]) == 0
    lines = res.read_text().splitlines()
    assert len(lines) == 6
    assert main(["certify", str(run), "--method", "bab", "--eps", "0.05", "--n", "9", "--timeout", "5",
                 "--out", str(res), "--no-progress"]) == 0  # resumes: 3 more
    out = capsys.readouterr().out
    assert len(res.read_text().splitlines()) == 9 and "verified" in out
    assert main(["certify", str(run), "--method", "crown", "--eps", "0.05", "--n", "9", "--out", str(res)]) == 2
    # --float64: the same statuses as float32 on this small net, its own default file, never mixed with float32 lines
    for method in ("crown", "bab"):
        assert main(["certify", str(run), "--method", method, "--eps", "0.05", "--n", "9", "--timeout", "5",
                     "--float64", "--no-progress"]) == 0
        f64 = run / f"certify_{method}_{cfg.norm}_0.05_float64.jsonl"
        recs = [json.loads(line) for line in f64.read_text().splitlines()]
        assert len(recs) == 9 and {r["dtype"] for r in recs} == {"float64"}
    assert [r["status"] for r in recs] == [json.loads(line)["status"] for line in res.read_text().splitlines()]
    capsys.readouterr()
    assert main(["certify", str(run), "--method", "bab", "--eps", "0.05", "--n", "9", "--out", str(f64)]) == 2
    assert "float64" in capsys.readouterr().err
    # result files written before the dtype key existed read as float32
    old = [{k: v for k, v in json.loads(line).items() if k != "dtype"} for line in res.read_text().splitlines()]
    res.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert main(["certify", str(run), "--method", "bab", "--eps", "0.05", "--n", "9", "--out", str(res),
                 "--no-progress"]) == 0
    assert len(res.read_text().splitlines()) == 9
    # --device: the same results on the device as on the CPU where there is a GPU, a one-line error where there is not
    capsys.readouterr()
    code = main(["diagnose", str(run), "--relaxations", "ibp,crown", "--n", "8", "--lp-samples", "2", "--grid", "5",
                 "--device", "cuda", "--json", str(tmp_path / "d_dev.json")])
    if torch.cuda.is_available():
        assert code == 0
        cpu, dev_rows = (json.loads((tmp_path / f).read_text()) for f in ("d.json", "d_dev.json"))
        for a, b in zip(cpu, dev_rows):
            assert a["relaxation"] == b["relaxation"] and a["certified"] == b["certified"]
            assert a["width"] == pytest.approx(b["width"], rel=1e-4)
            assert a["lp_gap"] == pytest.approx(b["lp_gap"], abs=1e-4)
    else:
        assert code == 2 and "CUDA is not available" in capsys.readouterr().err
    capsys.readouterr()
    dev = tmp_path / "dev.jsonl"
    code = main(["certify", str(run), "--method", "bab", "--eps", "0.05", "--n", "9", "--timeout", "5",
                 "--device", "cuda", "--out", str(dev), "--no-progress"])
    if torch.cuda.is_available():
        assert code == 0
        assert [json.loads(line)["status"] for line in dev.read_text().splitlines()] == \
            [json.loads(line)["status"] for line in res.read_text().splitlines()]
    else:
        assert code == 2 and "CUDA is not available" in capsys.readouterr().err and not dev.exists()


def test_certify_results_are_tied_to_the_checkpoint(tmp_path, capsys):
    """Result lines name the checkpoint and its digest: --which best gets its own default file, and lines of a
    checkpoint that changed since (the run trained further) are refused instead of mixed with the new model's."""
    from certlab.cli import main
    from certlab.train import TrainConfig, train
    from certlab.train import checkpoint as ckpt

    cfg = TrainConfig(dataset="spheres", data={"d": 4, "n": 100}, model="mlp", model_params={"hidden": [8]},
                      epochs=1, lr=0.01, eps=0.05, batch_size=50, eval_n=5, eval_attacks=[], eval_certify=["ibp"])
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    args = ["certify", str(run), "--method", "ibp", "--eps", "0.05", "--n", "4", "--no-progress"]
    assert main(args) == 0 and main(args + ["--which", "best"]) == 0
    last = run / f"certify_ibp_{cfg.norm}_0.05.jsonl"
    best = run / f"certify_ibp_{cfg.norm}_0.05_best.jsonl"
    assert {json.loads(line)["checkpoint"] for line in last.read_text().splitlines()} == {"last"}
    assert {json.loads(line)["checkpoint"] for line in best.read_text().splitlines()} == {"best"}
    state = ckpt.load(run / "last.pt")
    state["model"] = {k: v + 0.01 for k, v in state["model"].items()}
    ckpt.save(run / "last.pt", state)
    capsys.readouterr()
    assert main(args + ["--n", "6"]) == 2
    assert "earlier version of last.pt" in capsys.readouterr().err
    # lines written before the keys existed: the checkpoint was then "best" by default, the digest is unknown
    old = [{k: v for k, v in json.loads(line).items() if not k.startswith("checkpoint")}
           for line in best.read_text().splitlines()]
    best.write_text("".join(json.dumps(r) + "\n" for r in old))
    assert main(args + ["--which", "best", "--n", "6"]) == 0
    assert len(best.read_text().splitlines()) == 6
    assert main(args + ["--n", "6", "--out", str(best)]) == 2  # last's results never go into best's file
