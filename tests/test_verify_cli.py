"""General properties (disjunctions of conjunctions of linear output constraints over boxes) against the exact MILP,
and the ``certlab verify`` command on generated ONNX networks and VNN-LIB files."""

import time

import numpy as np
import pytest
import torch
from torch import nn

import certlab
from certlab.cli import main
from certlab.verify import milp
from certlab.verify.decide import decide
from certlab.verify.property import Property, Region

onnx = pytest.importorskip("onnx")


def _net(n_in=2, h=10, K=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, K)).eval()


def _exact_min(model, lo, hi, C):
    """Exact min of each row of C·f over the box (MILP with IBP big-M bounds, independent of the tested code)."""
    x = torch.as_tensor((lo + hi) / 2, dtype=torch.float32).reshape(1, -1)
    box = certlab.Box(torch.as_tensor(lo, dtype=torch.float32).reshape(1, -1),
                      torch.as_tensor(hi, dtype=torch.float32).reshape(1, -1))
    low, _ = milp.exact_bounds(model, x, box, torch.as_tensor(C, dtype=torch.float32).unsqueeze(0))
    return low[0].double().numpy()


def _grid_violation(model, region, k=60):
    g = np.stack(np.meshgrid(*[np.linspace(a, b, k) for a, b in zip(region.lower, region.upper)]), -1).reshape(-1, 2)
    with torch.no_grad():
        f = model.double()(torch.as_tensor(g)).numpy()
    model.float()
    return any(region.satisfied(fi) is not None for fi in f)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_disjunctions_against_exact_milp(seed):
    model = _net(seed=seed)
    rng = np.random.default_rng(seed)
    lo, hi = np.array([-0.3, -0.6]), np.array([0.5, 0.2])
    # a disjunction of single-row conjunctions: sat iff some exact minimum ≤ its constant
    C = rng.normal(size=(3, 3))
    m = _exact_min(model, lo, hi, C)
    for shift in (np.array([-0.1, -0.05, -0.2]), np.array([-0.1, 0.05, -0.2])):
        d = m + shift
        prop = Property(2, 3, [Region(lo, hi, [(C[i:i + 1], d[i:i + 1]) for i in range(3)])])
        truth = "sat" if (m <= d).any() else "unsat"
        for method in ("milp", "bab", "auto"):
            a = decide(model, prop, (2,), method, 20)
            assert a.status == truth, (method, a.status, truth)
            if a.status == "sat":
                assert prop.violation(a.x, a.y) and np.allclose(model.double()(torch.as_tensor(a.x)[None])[0].detach(),
                                                                a.y)
                model.float()
        assert decide(model, prop, (2,), "crown", 20).status in (truth, "unknown")
    # conjunctions of two rows over two boxes: milp (exact) and input splitting agree; grid points never contradict
    for trial in range(3):
        conj = [(rng.normal(size=(2, 3)), rng.normal(size=2) * 0.3) for _ in range(2)]
        regions = [Region(lo, hi, conj[:1]), Region(lo + 1, hi + 1, conj[1:])]
        prop = Property(2, 3, regions)
        got = {meth: decide(model, prop, (2,), meth, 20).status for meth in ("milp", "auto")}
        assert got["milp"] == got["auto"] and got["milp"] in ("sat", "unsat"), got
        if any(_grid_violation(model, r) for r in regions):
            assert got["milp"] == "sat"


def _instance(tmp_path, eps, name):
    from certlab.interchange import export_onnx, write_vnnlib

    model = nn.Sequential(nn.Flatten(), *_net(4, 16, 3, seed=3)).eval()
    export_onnx(model, (1, 2, 2), tmp_path / "net.onnx")
    x = torch.full((1, 1, 2, 2), 0.5)
    with torch.no_grad():
        y = int(model(x).argmax())
    write_vnnlib(tmp_path / name, x, y, eps, 3)
    return model


def test_verify_command_single_and_batch(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    model = _instance(tmp_path, 0.001, "small.vnnlib")
    _instance(tmp_path, 0.5, "large.vnnlib")
    assert main(["verify", str(tmp_path / "net.onnx"), str(tmp_path / "small.vnnlib"), "--timeout", "20"]) == 0
    assert capsys.readouterr().out == "unsat\n"
    out = tmp_path / "res.txt"
    assert main(["verify", str(tmp_path / "net.onnx"), str(tmp_path / "large.vnnlib"), "--timeout", "20",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out and text.startswith("sat\n((X_0 ")
    vals = dict(line.strip(" ()").split() for line in text.splitlines()[1:])
    x = np.array([float(vals[f"X_{i}"]) for i in range(4)], dtype=np.float32)
    s = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    yo = s.run(None, {"input": x.reshape(1, 1, 2, 2)})[0][0]
    assert np.allclose(yo, [float(vals[f"Y_{j}"]) for j in range(3)])
    assert np.all(np.abs(x - 0.5) <= 0.5 + 1e-7)
    with torch.no_grad():  # the witness is misclassified (or ties)
        y0 = int(model(torch.full((1, 1, 2, 2), 0.5)).argmax())
        assert int(model(torch.as_tensor(x).reshape(1, 1, 2, 2)).argmax()) != y0 or yo.max() <= yo[y0]
    # batch: instances CSV (paths relative to it), results CSV, resumed where it stopped
    (tmp_path / "instances.csv").write_text("net.onnx,small.vnnlib,20\nnet.onnx,large.vnnlib,20\n")
    res = tmp_path / "results.csv"
    res.write_text("onnx,vnnlib,result,time\nnet.onnx,small.vnnlib,unknown,1.0\n")  # pretend it was done
    assert main(["verify", "--instances", str(tmp_path / "instances.csv"), "--out", str(res)]) == 0
    rows = res.read_text().splitlines()
    assert rows[1] == "net.onnx,small.vnnlib,unknown,1.0" and rows[2].startswith("net.onnx,large.vnnlib,sat,")
    assert "sat=1 unknown=1" in capsys.readouterr().out


def test_verify_command_errors_and_deadline(tmp_path, capsys):
    _instance(tmp_path, 0.01, "p.vnnlib")
    (tmp_path / "bad.vnnlib").write_text("(declare-const X_0 Real)\n(assert (foo X_0 1))\n")
    assert main(["verify", str(tmp_path / "net.onnx"), str(tmp_path / "bad.vnnlib")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("certlab verify: error:") and "bad.vnnlib:2" in err[-1]
    assert main(["verify", str(tmp_path / "net.onnx"), str(tmp_path / "missing.vnnlib")]) == 2
    # the deadline holds within a second whatever the solver does: a wide box on a bigger net, 1 s
    from certlab.interchange import export_onnx, write_vnnlib
    from certlab.verify.vnncomp import verify_instance

    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(40, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                        nn.Linear(200, 10)).eval()
    export_onnx(big, (40,), tmp_path / "big.onnx")
    x = torch.rand(1, 40)
    write_vnnlib(tmp_path / "big.vnnlib", x, int(big(x).argmax()), 0.05, 10)
    t0 = time.perf_counter()
    status, _, took, _ = verify_instance(str(tmp_path / "big.onnx"), str(tmp_path / "big.vnnlib"), 1.0, "milp")
    assert time.perf_counter() - t0 <= 2.0 and status in ("timeout", "unsat", "sat", "unknown")


def test_convolutional_network_on_a_per_pixel_box():
    """A network starting with a convolution takes the box as a certlab.Box; bab and crown agree with the MILP."""
    torch.manual_seed(5)
    model = nn.Sequential(certlab.nn.Normalize([0.4], [0.3]), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(27, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    rng = np.random.default_rng(5)
    x = rng.uniform(0.2, 0.8, size=9)
    with torch.no_grad():
        y = int(model(torch.as_tensor(x, dtype=torch.float32).reshape(1, 1, 3, 3)).argmax())
    from certlab.verify.property import robustness

    seen = set()
    for scale in (0.01, 0.3, 1.0):
        w = scale * rng.uniform(0.2, 1.0, size=9)
        prop = robustness(x - w, x + w, y, 3)
        truth = decide(model, prop, (1, 3, 3), "milp", 20).status
        assert truth in ("sat", "unsat")
        seen.add(truth)
        assert decide(model, prop, (1, 3, 3), "bab", 20).status == truth
        assert decide(model, prop, (1, 3, 3), "crown", 20).status in (truth, "unknown")
    assert seen == {"sat", "unsat"}
