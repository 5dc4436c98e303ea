"""The VNN-LIB reader: every form VNN-COMP uses, round trips with the writer, one-line errors."""

import numpy as np
import pytest
import torch

from certlab.errors import CertlabError
from certlab.interchange.vnnlib import read_property, read_vnnlib, write_vnnlib
from certlab.verify.property import Property, Region, robustness

HEAD = "".join(f"(declare-const X_{i} Real)\n" for i in range(2)) + "".join(
    f"(declare-const Y_{j} Real)\n" for j in range(3))


def _read(tmp_path, body, name="p.vnnlib"):
    p = tmp_path / name
    p.write_text(HEAD + body)
    return read_property(p)


def test_round_trip_with_writer(tmp_path):
    x = torch.rand(2, 3)
    write_vnnlib(tmp_path / "r.vnnlib", x, 1, 0.05, 4)
    prop = read_property(tmp_path / "r.vnnlib")
    lo, hi = np.clip(x.numpy().ravel() - 0.05, 0, 1), np.clip(x.numpy().ravel() + 0.05, 0, 1)
    want = robustness(lo, hi, 1, 4)
    (r,), (w,) = prop.regions, want.regions
    assert np.allclose(r.lower, w.lower) and np.allclose(r.upper, w.upper)
    assert len(r.conjunctions) == 3
    for (C, d), (Cw, dw) in zip(r.conjunctions, w.conjunctions):
        assert np.array_equal(C, Cw) and np.array_equal(d, dw)
    assert read_vnnlib(tmp_path / "r.vnnlib")[2:] == (1, [0, 2, 3])


def test_forms_vnncomp_uses(tmp_path):
    body = """; comment
(assert (<= X_0 0.5))
(assert (>= X_0 -0.5))  ; trailing comment
(assert (>= 1.0 X_1))
(assert (<= 0 X_1))
(assert (<= Y_0 Y_1))
(assert (or (and (>= Y_2 3.5) (<= (+ Y_0 (* 2 Y_1)) (- 1 Y_2))) (and (> Y_0 1e-3))))
"""
    prop = _read(tmp_path, body)
    (r,) = prop.regions
    assert np.array_equal(r.lower, [-0.5, 0.0]) and np.array_equal(r.upper, [0.5, 1.0])
    (C1, d1), (C2, d2) = r.conjunctions
    assert np.allclose(C1, [[1, -1, 0], [0, 0, -1], [1, 2, 1]]) and np.allclose(d1, [0, -3.5, 1])
    assert np.allclose(C2, [[1, -1, 0], [-1, 0, 0]]) and np.allclose(d2, [0, -1e-3])
    # f satisfies conjunction 1: Y_0 ≤ Y_1, Y_2 ≥ 3.5, Y_0 + 2 Y_1 + Y_2 ≤ 1
    assert r.satisfied([-5.0, -1.0, 4.0]) == 0 and r.satisfied([0.5, 1.0, 0.0]) == 1 and r.satisfied([2, 1, 0]) is None


def test_disjunction_of_boxes(tmp_path):
    body = """(assert (or (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_0 Y_1))
                (and (>= X_0 2) (<= X_0 3) (>= X_1 0) (<= X_1 1) (<= Y_0 Y_2))
                (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1) (<= Y_1 Y_2))))
"""
    prop = _read(tmp_path, body)
    assert len(prop.regions) == 2 and [len(r.conjunctions) for r in prop.regions] == [2, 1]
    assert prop.violation([2.5, 0.5], [0, 1, 1]) and not prop.violation([1.5, 0.5], [0, 1, 1])


@pytest.mark.parametrize("body,match", [
    ("(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (<= X_1 1))\n(assert (>= X_1 0))\n(assert (foo Y_0 1))\n",
     r"p.vnnlib:10: unsupported construct '\(foo'"),
    ("(assert (<= (+ X_0 X_1) 1))\n", r":6: unsupported construct: a constraint on several inputs"),
    ("(assert (<= X_0 Y_0))\n", r":6: unsupported construct: a constraint mixing inputs and outputs"),
    ("(assert (<= X_0 1)\n", r":6: '\(' is never closed"),
    ("(assert (<= Z_0 1))\n", r":6: unknown symbol 'Z_0'"),
    ("(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (>= X_1 0))\n", r"X_1 is not bounded"),
    ("(assert (<= (* Y_0 Y_1) 1))\n", r"not linear"),
    ("(declare-fun f () Real)\n", r":6: unsupported construct '\(declare-fun'"),
])
def test_errors_name_construct_and_line(tmp_path, body, match):
    with pytest.raises(CertlabError, match=match) as e:
        _read(tmp_path, body)
    assert "\n" not in str(e.value)


def test_corrupt_files(tmp_path):
    (tmp_path / "bin.vnnlib").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CertlabError, match="not a readable text file|unsupported"):
        read_property(tmp_path / "bin.vnnlib")
    with pytest.raises(CertlabError, match="not found"):
        read_property(tmp_path / "none.vnnlib")
    (tmp_path / "empty.vnnlib").write_text("; nothing\n")
    with pytest.raises(CertlabError, match="declares 0 inputs"):
        read_property(tmp_path / "empty.vnnlib")
    with pytest.raises(CertlabError, match="lower bound"):
        Region([1.0], [0.0])
    with pytest.raises(CertlabError):
        Property(2, 3, [Region([0, 0], [1, 1], [(np.zeros((1, 2)), np.zeros(1))])])
