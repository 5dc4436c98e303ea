"""ONNX export/import and VNN-LIB properties."""

import numpy as np
import pytest
import torch
from torch import nn

import certlab
from certlab.errors import CertlabError, UnsupportedLayerError
from certlab.interchange import export_onnx, load_onnx, read_vnnlib, vnnlib_text, write_vnnlib

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _cnn():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    m = nn.Sequential(certlab.nn.Normalize([0.5], [0.3]), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                      certlab.nn.Residual(body), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 2, 3, stride=2, padding=1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8, 10), nn.ReLU(), nn.Dropout(), nn.Linear(10, 3))
    with torch.no_grad():
        body[1].running_mean.uniform_(-1, 1)
        body[1].running_var.uniform_(0.5, 2)
    return m.eval()


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(certlab.nn.Normalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7]), nn.Linear(3, 8), nn.BatchNorm1d(8),
                         nn.ReLU(), certlab.nn.Residual(nn.Sequential(nn.Linear(8, 8), nn.ReLU())), nn.Linear(8, 2)).eval()


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.as_tensor(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("build,shape", [(_cnn, (1, 8, 8)), (_mlp, (3,))], ids=["cnn", "mlp"])
def test_export_matches_torch_and_round_trips(tmp_path, build, shape):
    model = build()
    path = tmp_path / "m.onnx"
    export_onnx(model, shape, path)
    x = torch.rand(7, *shape)
    with torch.no_grad():
        ref = model(x)
    assert (_run(path, x) - ref).abs().max() <= 1e-6
    back = load_onnx(path)
    assert isinstance(back, nn.Sequential)
    with torch.no_grad():
        assert (back(x) - ref).abs().max() <= 1e-5
    th = certlab.LinfBall(0.02)
    a, b = certlab.bounds(model, x, th, "crown"), certlab.bounds(back, x, th, "crown")
    assert torch.allclose(a.lower, b.lower, atol=1e-4) and torch.allclose(a.upper, b.upper, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_load_foreign_graphs(tmp_path):
    """A hand-written MatMul + Add + Reshape graph and (if available) torch's own exporter."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    W1, b1, W2 = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32), \
        rng.normal(size=(5, 2)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["f"]), helper.make_node("MatMul", ["f", "W1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]), helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    inits = [numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape"), numpy_helper.from_array(W1, "W1"),
             numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(W2, "W2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "hand.onnx")
    net = load_onnx(tmp_path / "hand.onnx")
    x = torch.rand(3, 1, 2, 2)
    with torch.no_grad():
        assert (net(x) - _run(tmp_path / "hand.onnx", x)).abs().max() <= 1e-5
    ref = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    try:
        torch.onnx.export(ref, (x,), str(tmp_path / "t.onnx"), dynamo=False, input_names=["input"])
    except Exception:  # noqa: BLE001 - the legacy exporter may be gone in later torch versions
        return
    net = load_onnx(tmp_path / "t.onnx")
    with torch.no_grad():
        assert (net(x) - ref(x)).abs().max() <= 1e-6


def test_unsupported_is_reported(tmp_path):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("Tanh", ["a"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedLayerError, match="Sigmoid, Tanh"):
        load_onnx(tmp_path / "bad.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CertlabError):
        load_onnx(tmp_path / "junk.onnx")
    with pytest.raises(CertlabError):
        load_onnx(tmp_path / "missing.onnx")
    with pytest.raises(UnsupportedLayerError):
        export_onnx(nn.Sequential(nn.Linear(3, 3), nn.Sigmoid()), (3,), tmp_path / "s.onnx")


def test_vnnlib_property(tmp_path):
    x = torch.tensor([[0.05, 0.5], [0.97, 0.2]])
    p = tmp_path / "p.vnnlib"
    write_vnnlib(p, x, 2, 0.1, 4)
    text = p.read_text()
    assert text.count("(declare-const X_") == 4 and text.count("(declare-const Y_") == 4
    lo, hi, label, others = read_vnnlib(p)
    assert label == 2 and others == [0, 1, 3]
    box_lo, box_hi = certlab.LinfBall(0.1).interval_hull(x.reshape(1, -1))
    assert np.allclose(lo, box_lo.numpy().ravel()) and np.allclose(hi, box_hi.numpy().ravel())
    assert "(>= Y_1 Y_2)" in text
    with pytest.raises(CertlabError):
        vnnlib_text(x, 5, 0.1, 4)
    with pytest.raises(CertlabError):
        vnnlib_text(x, 1, -0.1, 4)


def test_export_cli(tmp_path):
    from certlab.cli import main
    from certlab.train import TrainConfig, train

    cfg = TrainConfig(dataset="spheres", data={"d": 4, "n": 100}, model="mlp", model_params={"hidden": [8]},
                      epochs=1, eps=0.05, batch_size=50, eval_n=10, eval_attacks=[], eval_certify=["ibp"],
                      eval_acr=False)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    out, prop = tmp_path / "m.onnx", tmp_path / "p.vnnlib"
    assert main(["export", str(run), "--onnx", str(out), "--vnnlib", str(prop), "--index", "3", "--eps", "0.05"]) == 0
    model, _ = certlab.train.load_run(run)
    x = torch.rand(5, 4)
    with torch.no_grad():
        assert (_run(out, x) - model(x)).abs().max() <= 1e-6
    assert read_vnnlib(prop)[0].shape == (4,)
    assert main(["export", str(run)]) == 2


def _graph(tmp_path, nodes, inits, in_shape, out_shape, name="g.onnx"):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.int64 if k.startswith("shape") or k.startswith("ax")
                                                else np.float32), k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, tmp_path / name)
    return tmp_path / name


def _agree(path, shape, n=5, atol=1e-5):
    net = load_onnx(path)
    x = torch.rand(1 if shape[0] == 1 else n, *shape[1:]) * 2 - 1
    with torch.no_grad():
        assert (net(x).reshape(x.shape[0], -1) - _run(path, x).reshape(x.shape[0], -1)).abs().max() <= atol
    return net


def test_import_acas_like_broadcast_constants(tmp_path, recwarn):
    """Input [1,1,1,5]; per-feature Sub/Div (one of them by a constant holding 0 in a Mul), MatMul with the constant
    first and second, Squeeze/Unsqueeze/Transpose that only move unit axes; checked against ONNX Runtime."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = {"m": rng.normal(size=(1, 1, 1, 5)), "s": rng.uniform(0.5, 2, size=5), "z": [1.0, 0.0, 2.0, -1.0, 0.5],
             "W1": rng.normal(size=(5, 8)), "b1": rng.normal(size=8), "W2": rng.normal(size=(3, 8)),
             "b2": rng.normal(size=(3, 1)), "ax0": [0], "ax2": [2]}
    nodes = [helper.make_node("Sub", ["x", "m"], ["a"]), helper.make_node("Div", ["a", "s"], ["b"]),
             helper.make_node("Mul", ["b", "z"], ["c"]), helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Squeeze", ["t", "ax0"], ["q"]), helper.make_node("Flatten", ["q"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("Transpose", ["r"], ["rc"], perm=[1, 0]),
             helper.make_node("MatMul", ["W2", "rc"], ["o"]), helper.make_node("Add", ["o", "b2"], ["ob"]),
             helper.make_node("Transpose", ["ob"], ["y"], perm=[1, 0])]
    path = _graph(tmp_path, nodes, inits, [1, 1, 1, 5], [1, 3])
    net = _agree(path, (1, 1, 1, 5))
    assert not [w for w in recwarn if "divide" in str(w.message)]
    x = torch.rand(1, 1, 1, 5)
    b = certlab.bounds(net, x, certlab.LinfBall(0.1, domain=None), "crown")
    assert (b.lower <= net(x)).all() and (net(x) <= b.upper).all()


def test_import_zero_pad_folds_into_conv(tmp_path):
    from onnx import helper

    rng = np.random.default_rng(1)
    inits = {"pads": [0, 0, 1, 2, 0, 0, 1, 2], "W": rng.normal(size=(2, 1, 3, 3)), "Wf": rng.normal(size=(48, 2)),
             "nm": rng.normal(size=(1, 1, 4, 4)), "one": [1.0]}
    inits["pads"] = np.array(inits["pads"])
    nodes = [helper.make_node("Sub", ["x", "nm"], ["xn"]), helper.make_node("Pad", ["xn", "shape_pads"], ["p"]),
             helper.make_node("Conv", ["p", "W"], ["c"], kernel_shape=[3, 3]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "Wf"], ["y"])]
    inits["shape_pads"] = inits.pop("pads")
    inits.pop("one")
    # a per-pixel Sub before a Conv cannot be folded into a Linear: a one-line error naming the node
    path = _graph(tmp_path, nodes, inits, ["N", 1, 4, 4], ["N", 2])
    with pytest.raises(UnsupportedLayerError, match="Sub 'node_sub'|Sub ''"):
        load_onnx(path)
    nodes[0] = helper.make_node("Sub", ["x", "one"], ["xn"])
    inits["one"] = [0.25]
    inits.pop("nm")
    path = _graph(tmp_path, nodes, inits, ["N", 1, 4, 4], ["N", 2], "pad.onnx")
    net = _agree(path, (5, 1, 4, 4))
    assert net[1].padding == (1, 2)


def test_import_errors_name_operator_and_node(tmp_path):
    from onnx import helper

    nodes = [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], name="pool7")]
    path = _graph(tmp_path, nodes, {}, ["N", 1, 4, 4], ["N", 1, 2, 2])
    with pytest.raises(UnsupportedLayerError, match="MaxPool node 'pool7'") as e:
        load_onnx(path)
    assert "\n" not in str(e.value)
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("Flatten", ["t"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm")]
    path = _graph(tmp_path, nodes, {"W": rng.normal(size=(6, 2))}, ["N", 2, 3], ["N", 2], "perm.onnx")
    with pytest.raises(CertlabError, match="Transpose"):
        load_onnx(path)
    nodes = [helper.make_node("Div", ["x", "z"], ["y"], name="d0")]
    path = _graph(tmp_path, nodes, {"z": [1.0, 0.0]}, ["N", 2], ["N", 2], "div.onnx")
    with pytest.raises(CertlabError, match="Div 'd0'.*contains 0"):
        load_onnx(path)
