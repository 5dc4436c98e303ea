"""Relaxation diagnostics: the paper's continuity and sensitivity classes on constructed cases whose answer is known
analytically, tightness orderings that theory guarantees, and the CLI table."""

import json
import math

import pytest
import torch

import certlab
from nets import mlp
from certlab.errors import InputError
from certlab.verify import diagnostics


def _net(seed, widths=(4, 16, 16, 3), relu=True):
    return mlp(seed, widths, relu=relu)


PAPER = {  # Jovanović et al. 2022, Table 1: (continuous, sensitive)
    "ibp": (True, False), "hbox": (False, False), "crown": (False, True), "deepz": (True, True),
    "crown-ibp": (False, True),
}


@pytest.mark.parametrize("method", sorted(PAPER))
def test_transformer_classes_are_the_papers(method):
    p = diagnostics.transformer_properties(method)
    assert (p["continuous"], p["sensitive"]) == PAPER[method]
    assert (p["relu_jump"] < diagnostics.JUMP_TOL) == p["continuous"]
    assert (p["relu_curv"] > diagnostics.CURV_TOL) == p["sensitive"]


def test_fastlin_is_in_deepz_class():
    p = diagnostics.transformer_properties("fastlin")
    assert p["continuous"] and p["sensitive"]


def _probe(method, l, u):
    return diagnostics.relu_probe(method, torch.tensor(l, dtype=torch.float64), torch.tensor(u, dtype=torch.float64))


def test_crown_lower_slope_switches_at_abs_l_equals_u():
    """CROWN's lower line of ReLU(z) is 0 for u < −l and z for u > −l: the lower bound of ReLU(z) over [l, u] is 0
    on one side of |l| = |u| and l on the other."""
    from certlab.bounds.relu import relu_lines

    a, _, _ = relu_lines(torch.tensor([-1.0, -1.0]), torch.tensor([0.999, 1.001]))
    assert a.tolist() == [0.0, 1.0]
    for m in ("crown", "crown-ibp"):
        b = _probe(m, [-1.0, -1.0], [1 - 1e-9, 1 + 1e-9])
        assert b[0, 0] == pytest.approx(0.0, abs=1e-12) and b[1, 0] == pytest.approx(-1.0, abs=1e-8)


def test_ibp_and_deepz_have_no_jump_where_crown_and_hbox_switch():
    ls = [-1.0, -1.0, -1e-9, 1e-9]
    us = [1 - 1e-9, 1 + 1e-9, 1.0, 1.0]
    for m in ("ibp", "deepz", "fastlin"):
        b = _probe(m, ls, us)
        assert (b[0] - b[1]).abs().max() < 1e-7 and (b[2] - b[3]).abs().max() < 1e-7, m
    # analytically: DeepZ's lower bound of ReLU(z) is λl with λ = u/(u − l); IBP's is relu(l) = 0
    assert _probe("deepz", [-1.0], [1.0])[0, 0] == pytest.approx(-0.5)
    assert _probe("ibp", [-1.0], [1.0])[0, 0] == 0.0


def test_hbox_jumps_where_l_crosses_zero():
    """hBox boxes a crossing neuron to [0, u] (its correlation with x1 lost) and keeps it exact once l ≥ 0: the
    lower bound of ReLU(z) − x1 is −(u/4 + ρ) just below l = 0 and (u/4 − (u/2 − ρ)) just above, a jump of 2ρ."""
    rho = diagnostics._RHO
    b = _probe("hbox", [-1e-9, 1e-9], [1.0, 1.0])
    assert b[0, 1] == pytest.approx(-(0.25 + rho), abs=1e-8)
    assert b[1, 1] == pytest.approx(0.25 - (0.5 - rho), abs=1e-8)
    c = _probe("hbox", [-1.0, -1.0], [1 - 1e-9, 1 + 1e-9])  # no switch at |l| = |u|
    assert (c[0] - c[1]).abs().max() < 1e-7


def _one_neuron(bias):
    """x ↦ [ReLU(x + b), −ReLU(x + b)]: with y = 0 the margin is 2·ReLU(x + b)."""
    net = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.ReLU(), torch.nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.fill_(bias)
        net[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[2].bias.zero_()
    return net.eval()


def test_loss_jump_detects_crowns_discontinuity_on_one_neuron():
    """x = 0.5, ε = 0.3: z ∈ [0.2 + b, 0.8 + b], |l| = |u| at b = −0.5. The scan moves b over ±0.1 around
    −0.487: CROWN's margin bound 2·a·l jumps from 0 to −0.6, so the loss CE(−m) jumps by log(1 + e^0.6) − log 2;
    IBP's (2·relu(l) = 0) and DeepZ's do not jump."""
    net = _one_neuron(-0.487)
    x, y = torch.tensor([[0.5]]), torch.tensor([0])
    norm = math.sqrt(sum(float((p.detach() ** 2).sum()) for p in net.parameters()))
    d = [torch.zeros_like(p) for p in net.parameters()]
    d[1].fill_(1.0)  # the first bias only
    kw = dict(grid=9, radius=0.1 / norm, direction=d, refine=30)
    j = {m: diagnostics.loss_jump(net, x, y, certlab.LinfBall(0.3), m, **kw) for m in ("crown", "ibp", "deepz")}
    assert j["crown"] == pytest.approx(math.log(1 + math.exp(0.6)) - math.log(2), rel=1e-3)
    assert j["ibp"] < 1e-8 and j["deepz"] < 1e-6
    with pytest.raises(InputError):
        diagnostics.loss_jump(net, x, y, certlab.LinfBall(0.3), "crown", grid=2)


def test_tightness_ordering_on_a_linear_network():
    """Without ReLUs CROWN's bounds are exact, so its 1/gap is the largest of any sound relaxation; widening IBP
    (box-dc, then box-c by more) only lowers it."""
    model = _net(2, relu=False)
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    rows = diagnostics.diagnose(model, (x, y), certlab.LinfBall(0.05), ("ibp", "hbox", "deepz", "crown"), n=8,
                                lp_samples=0, grid=0)
    r = {row["relaxation"]: row["inv_gap"] for row in rows}
    assert all(r["crown"] >= v * (1 - 1e-5) for v in r.values()) and r["crown"] > 1.05 * r["ibp"]
    model = _net(4)
    rows = diagnostics.diagnose(model, (x, model(x).argmax(1)), certlab.LinfBall(0.05),
                                ("ibp", "box-dc:0.2:10", "box-c:0.2"), n=8, lp_samples=0, grid=0)
    g = [row["inv_gap"] for row in rows]
    assert g[0] > g[1] > g[2] > 0
    assert all(row["loss_jump"] is None for row in rows)


def test_diagnose_rows():
    torch.manual_seed(0)
    model = _net(0)
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    rows = diagnostics.diagnose(model, (x, y), certlab.LinfBall(0.05), ("ibp", "crown", "crown-ibp", "fastlin"),
                                n=16, lp_samples=3, grid=5)
    r = {row["relaxation"]: row for row in rows}
    assert set(r) == {"ibp", "crown", "crown-ibp", "fastlin"}
    for m in r:  # the triangle LP (CROWN∩IBP intermediates) is at least as tight as each of these
        assert r[m]["lp_gap"] >= -1e-4
        assert 0.0 <= r[m]["certified"] <= 1.0 and r[m]["inv_gap"] > 0 and r[m]["loss_jump"] >= 0
    assert r["ibp"]["loss_jump"] < 1e-4  # IBP's loss is continuous in the weights (what is left: slope x bracket)
    assert r["ibp"]["width"] >= r["crown"]["width"] - 1e-6
    assert r["ibp"]["unstable"] >= r["crown"]["unstable"]
    assert r["crown-ibp"]["unstable"] == r["ibp"]["unstable"]  # both use IBP's intermediate bounds
    assert r["ibp"]["lp_gap"] > r["crown"]["lp_gap"]
    assert not r["crown"]["continuous"] and r["ibp"]["continuous"] and r["fastlin"]["sensitive"]
    text = diagnostics.format_rows(rows, "t")
    assert "crown-ibp" in text and "LP gap" in text and "loss jump" in text and " yes" in text
    with pytest.raises(InputError):
        diagnostics.diagnose(model, (x, y), certlab.LinfBall(0.05), ("nope",))
    with pytest.raises(InputError):
        diagnostics.diagnose(model, (x, y), certlab.LinfBall(0.05), ("ibp",), grid=2)


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
