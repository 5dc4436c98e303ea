"""Interchange with other verifiers: ONNX models and VNN-LIB properties.

    certlab.interchange.export_onnx(model, (1, 28, 28), "model.onnx")
    net = certlab.interchange.load_onnx("model.onnx")            # nn.Sequential, or CertlabError naming bad ops
    certlab.interchange.write_vnnlib("prop.vnnlib", x, y, eps=0.1, num_classes=10)
    prop = certlab.interchange.read_property("prop.vnnlib")      # any VNN-COMP property
    certlab.verify.decide.decide(net, prop, (1, 28, 28), "auto", timeout=60).status   # unsat | sat | timeout | unknown
"""

from certlab.interchange.vnnlib import read_property, read_vnnlib, vnnlib_text, write_vnnlib  # noqa: F401


def export_onnx(model, input_shape, path):
    from certlab.interchange.onnx import export_onnx as _export

    return _export(model, input_shape, path)


def load_onnx(path):
    from certlab.interchange.onnx import load_onnx as _load

    return _load(path)
