"""ONNX export and import of the networks certlab can bound, written with the ``onnx`` helper API (no torch
exporter, works offline).

Layer ↔ op: Linear ↔ Gemm (also MatMul [+ Add] on import, the constant on either side), Conv2d ↔ Conv,
ReLU ↔ Relu, Flatten ↔ Flatten, BatchNorm1d/2d (eval statistics) ↔ BatchNormalization, AvgPool2d ↔ AveragePool,
certlab.nn.Normalize ↔ Sub + Div by per-channel constants, Residual ↔ Add of two branches of one value; Identity,
Dropout are dropped on export and skipped on import.

On import, Sub/Div/Mul/Add by a constant of any broadcast shape become an elementwise affine map ``a ⊙ x + b``: a
per-channel (or per-feature) one with ``a > 0`` is a Normalize layer, any other is folded into the neighbouring
Linear layer (``W(a ⊙ x + b) = (W diag a) x + W b``). Reshape/Flatten/Squeeze/Unsqueeze/Transpose that keep the
order of the non-unit axes are layout only (a Flatten where the result is a vector); a zero constant Pad is folded
into the following convolution's padding.
The model input is named "input" with a dynamic batch dimension, the output "output".
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from certlab import nn as cnn
from certlab.errors import CertlabError, UnsupportedLayerError

OPSET = 17
IMPORTED = {"Gemm", "MatMul", "Conv", "Relu", "Flatten", "Reshape", "BatchNormalization", "AveragePool", "Sub",
            "Div", "Mul", "Add", "Identity", "Dropout", "Constant", "Transpose", "Squeeze", "Unsqueeze", "Pad"}
LAYOUT = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"}


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:  # pragma: no cover - optional extra
        raise CertlabError("ONNX support needs the optional extra: pip install 'certlab[onnx]'") from None
    return onnx, helper, numpy_helper


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class _Writer:
    def __init__(self):
        self.onnx, self.helper, self.nh = _onnx()
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, base):
        self.k += 1
        return f"{base}_{self.k}"

    def const(self, arr, base):
        n = self.name(base)
        self.inits.append(self.nh.from_array(np.ascontiguousarray(arr, dtype=np.float32), n))
        return n

    def node(self, op, inputs, base, **attrs):
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def emit(self, m: nn.Module, v: str, rank: int, where: str):
        """Append m applied to value v (tensor rank incl. batch); returns (output value, rank)."""
        t = lambda p: p.detach().cpu().numpy()  # noqa: E731
        if isinstance(m, nn.Sequential):
            for name, child in m.named_children():
                v, rank = self.emit(child, v, rank, f"{where}.{name}" if where else name)
            return v, rank
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return v, rank
        if isinstance(m, cnn.Residual):
            a, ra = self.emit(m.body, v, rank, f"{where}.body")
            b, rb = self.emit(m.shortcut, v, rank, f"{where}.shortcut")
            if a == v and b == v:
                two = self.const(np.array(2.0), "two")
                return self.node("Mul", [v, two], "res"), rank
            return self.node("Add", [a, b], "res"), ra
        if isinstance(m, nn.ReLU):
            return self.node("Relu", [v], "relu"), rank
        if isinstance(m, nn.Linear):
            ins = [v, self.const(t(m.weight), "W")]
            if m.bias is not None:
                ins.append(self.const(t(m.bias), "b"))
            return self.node("Gemm", ins, "fc", transB=1), 2
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise UnsupportedLayerError(f"layer '{where}' (Flatten) must flatten from dim 1 to -1")
            return self.node("Flatten", [v], "flat", axis=1), 2
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
                raise UnsupportedLayerError(f"layer '{where}' (Conv2d) needs zero padding given as numbers")
            ph, pw = (0, 0) if isinstance(m.padding, str) else _pair(m.padding)
            ins = [v, self.const(t(m.weight), "W")]
            if m.bias is not None:
                ins.append(self.const(t(m.bias), "b"))
            return self.node("Conv", ins, "conv", kernel_shape=list(m.kernel_size), strides=list(_pair(m.stride)),
                             pads=[ph, pw, ph, pw], dilations=list(_pair(m.dilation)), group=m.groups), 4
        if isinstance(m, nn.AvgPool2d):
            if m.ceil_mode or m.divisor_override is not None:
                raise UnsupportedLayerError(f"layer '{where}' (AvgPool2d) with ceil_mode/divisor_override")
            k = _pair(m.kernel_size)
            s = _pair(m.stride if m.stride is not None else m.kernel_size)
            p = _pair(m.padding)
            return self.node("AveragePool", [v], "pool", kernel_shape=list(k), strides=list(s),
                             pads=[p[0], p[1], p[0], p[1]], count_include_pad=int(m.count_include_pad)), 4
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not m.track_running_stats:
                raise UnsupportedLayerError(f"layer '{where}' ({type(m).__name__}) has no running statistics")
            C = m.num_features
            w = t(m.weight) if m.weight is not None else np.ones(C)
            b = t(m.bias) if m.bias is not None else np.zeros(C)
            ins = [v, self.const(w, "bn_w"), self.const(b, "bn_b"), self.const(t(m.running_mean), "bn_mean"),
                   self.const(t(m.running_var), "bn_var")]
            return self.node("BatchNormalization", ins, "bn", epsilon=float(m.eps)), rank
        if isinstance(m, cnn.Normalize):
            mean, std = t(m.mean), t(m.std)
            shape = (-1,) + (1,) * (rank - 2) if mean.size > 1 else ()
            v = self.node("Sub", [v, self.const(mean.reshape(shape), "mean")], "norm")
            return self.node("Div", [v, self.const(std.reshape(shape), "std")], "norm"), rank
        raise UnsupportedLayerError(f"layer '{where or '<model>'}' of type {type(m).__name__} cannot be exported to "
                                    "ONNX (supported: Sequential, Linear, Conv2d, ReLU, Flatten, BatchNorm, AvgPool2d, "
                                    "Identity, Dropout, certlab.nn.Normalize, certlab.nn.Residual)")


def export_onnx(model: nn.Module, input_shape, path) -> None:
    """Write ``model`` (eval-mode semantics) as a single-file ONNX graph for inputs [N, *input_shape] (atomic)."""
    if not isinstance(model, nn.Module):
        raise CertlabError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    input_shape = tuple(int(s) for s in input_shape)
    w = _Writer()
    onnx, helper = w.onnx, w.helper
    rank = 1 + len(input_shape)
    out, _ = w.emit(model, "input", rank, "")
    if out == "input":
        out = w.node("Identity", ["input"], "id")
    w.nodes.append(helper.make_node("Identity", [out], ["output"], name="output_identity"))
    with torch.no_grad():
        was = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            K = model(torch.zeros(1, *input_shape, device=next(iter(model.parameters()), torch.zeros(1)).device)).shape[1:]
        finally:
            for m, tr in was:
                m.training = tr
    inp = helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", *input_shape])
    outp = helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", *K])
    graph = helper.make_graph(w.nodes, "certlab", [inp], [outp], initializer=w.inits)
    mdl = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="certlab")
    mdl.ir_version = 8
    onnx.checker.check_model(mdl)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        onnx.save(mdl, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- import ---------------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, model):
        onnx, helper, nh = _onnx()
        self.nh, self.helper = nh, helper
        g = model.graph
        self.consts = {i.name: nh.to_array(i).astype(np.float64) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = nh.to_array(a.t).astype(np.float64)
        self.nodes = [n for n in g.node if n.op_type != "Constant"]
        inputs = [i.name for i in g.input if i.name not in self.consts]
        if len(inputs) != 1 or len(g.output) != 1:
            raise CertlabError(f"ONNX graph must have one input and one output, got {len(inputs)} and {len(g.output)}")
        self.input, self.output = inputs[0], g.output[0].name
        self.cons = {}
        for n in self.nodes:
            for v in n.input:
                if v and v not in self.consts:
                    self.cons.setdefault(v, []).append(n)
        self.shape, self.full, self.flat, self.pending_pad = {}, {}, {}, {}
        try:
            fixed = onnx.ModelProto()
            fixed.CopyFrom(model)
            for vi in fixed.graph.input:  # a symbolic batch dimension becomes 1 so every shape is known
                dims = vi.type.tensor_type.shape.dim
                if len(dims) and not dims[0].dim_value:
                    dims[0].dim_value = 1
            inferred = onnx.shape_inference.infer_shapes(fixed)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                if dims and all(d is not None for d in dims):
                    self.full[vi.name] = tuple(dims)
                    self.shape[vi.name] = tuple(dims[1:])
        except Exception:  # noqa: BLE001 - shapes are a convenience
            pass
        self.rank = {v: len(sh) + 1 for v, sh in self.shape.items()}
        self.flat[self.input] = len(self.shape.get(self.input, (0,))) <= 1

    def attrs(self, n):
        return {a.name: self.helper.get_attribute_value(a) for a in n.attribute}

    def dyn(self, n):
        return [v for v in n.input if v and v not in self.consts]

    def is_join(self, n):
        return n.op_type == "Add" and len(self.dyn(n)) == 2

    def walk(self, v, mods):
        """Convert the chain starting at value v; stops at the graph output or at a two-input Add (returned)."""
        while v != self.output:
            cons = self.cons.get(v, [])
            if len(cons) == 1:
                n = cons[0]
                if self.is_join(n):
                    return v, n
                v = self.convert(n, mods)
            elif len(cons) == 2:
                ends = []
                for c in cons:
                    if self.is_join(c):
                        ends.append(([], c))
                        continue
                    sub = []
                    w = self.convert(c, sub)
                    _, j = self.walk(w, sub)
                    ends.append((sub, j))
                (ma, ja), (mb, jb) = ends
                if ja is None or ja is not jb:
                    raise CertlabError(f"value {v!r} branches into paths that do not meet at one Add: not a residual block")
                body, short = (ma, mb) if ma else (mb, ma)
                mods.append(cnn.Residual(nn.Sequential(*body), nn.Sequential(*short) if short else nn.Identity()))
                v = ja.output[0]
            else:
                raise CertlabError(f"value {v!r} is used by {len(cons)} nodes; only chains and residual blocks are supported")
        return v, None

    def convert(self, n, mods):
        """Append the module(s) of node n; returns its output value (a MatMul may swallow the following Add)."""
        d = self.dyn(n)
        out = self._convert(n, mods)
        if n.op_type in ("Conv", "AveragePool"):
            self.flat[out] = False
        self.flat.setdefault(out, self.flat.get(d[0], False) if d else False)
        return out

    def to_vector(self, n, v, mods, column=False):
        """Make value v (about to enter a Linear layer) a vector per sample: a Flatten when only its last axis
        (column: its second-last) is longer than 1."""
        if self.flat.get(v, False):
            return
        shape = self.full.get(v)
        if shape is None:
            raise CertlabError(f"{n.op_type} '{n.name}': the shape of its input is unknown")
        keep = len(shape) - (2 if column else 1)
        if keep < 0 or any(d != 1 for i, d in enumerate(shape) if i != keep):
            raise CertlabError(f"{n.op_type} '{n.name}': a product over the last axis of a {(1, *shape)} tensor is not "
                               "supported (only vectors)")
        mods.append(nn.Flatten())
        self.flat[v] = True

    def layout(self, n, mods):
        """Reshape/Flatten/Squeeze/Unsqueeze/Transpose that only change the layout (see the module docstring)."""
        op, out = n.op_type, n.output[0]
        src, dst = self.full.get(n.input[0]), self.full.get(out)
        if src is None or dst is None:
            raise CertlabError(f"{op} '{n.name}': the shapes around it are unknown")
        if op == "Transpose":
            perm = list(self.attrs(n).get("perm", range(len(src) - 1, -1, -1)))
            moved = [p for p in perm if src[p] != 1]
            if moved != sorted(moved):
                raise CertlabError(f"Transpose '{n.name}': a permutation {perm} that reorders the data is not "
                                   "supported")
        nz = lambda sh: [d for d in sh if d != 1]  # noqa: E731
        if len(nz(dst)) <= 1 or len(dst) <= 2:
            if not self.flat.get(n.input[0], False):
                mods.append(nn.Flatten())
            self.flat[out] = True
        elif nz(dst) == nz(src) and not self.flat.get(n.input[0], False):
            self.flat[out] = False
        else:
            raise CertlabError(f"{op} '{n.name}': a reshape from {src} to {dst} is not supported "
                               "(only flattening and unit axes)")
        return out

    def _convert(self, n, mods):
        op, a = n.op_type, self.attrs(n)
        c = [self.consts.get(v) for v in n.input]
        out = n.output[0]
        if op in ("Identity", "Dropout"):
            return out
        if op == "Relu":
            mods.append(nn.ReLU())
            return out
        if op == "Gemm":
            if a.get("transA", 0) or c[1] is None or c[0] is not None:
                raise CertlabError(f"Gemm '{n.name}': only x·Wᵀ + b with a constant W is supported")
            W = c[1] if a.get("transB", 0) else c[1].T
            W = W * a.get("alpha", 1.0)
            b = c[2] * a.get("beta", 1.0) if len(c) > 2 and c[2] is not None else np.zeros(W.shape[0])
            self.to_vector(n, n.input[0], mods)
            mods.append(_linear(W, np.broadcast_to(b, (W.shape[0],))))
            return out
        if op == "MatMul":
            if (c[0] is None) == (c[1] is None):
                raise CertlabError(f"MatMul '{n.name}': only a product with one constant matrix is supported")
            if c[1] is not None:  # x·M: a Linear with W = Mᵀ on the last axis
                if c[1].ndim != 2:
                    raise CertlabError(f"MatMul '{n.name}': the constant must be a matrix, got shape {c[1].shape}")
                W = c[1].T
                self.to_vector(n, n.input[0], mods)
            else:  # M·x with x a column [k, 1] (or a vector): W = M
                shape = self.full.get(n.input[1]) or ()
                if c[0].ndim != 2 or (len(shape) >= 2 and shape[-1] != 1):
                    raise CertlabError(f"MatMul '{n.name}': a constant first operand needs a column vector input")
                W = c[0]
                self.to_vector(n, n.input[1], mods, column=True)
            b = np.zeros(W.shape[0])
            nxt = self.cons.get(out, [])
            if len(nxt) == 1 and nxt[0].op_type == "Add" and len(self.dyn(nxt[0])) == 1:
                bias = [self.consts[v] for v in nxt[0].input if v in self.consts][0]
                if bias.size in (1, W.shape[0]):
                    b = np.broadcast_to(bias.reshape(-1), (W.shape[0],)) + b
                    out = nxt[0].output[0]
            mods.append(_linear(W, b))
            self.flat[out] = True
            return out
        if op == "Conv":
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise CertlabError(f"Conv '{n.name}': auto_pad is not supported; give explicit pads")
            W = c[1]
            k = a.get("kernel_shape", list(W.shape[2:]))
            pads = list(a.get("pads", [0, 0, 0, 0]))
            extra = self.pending_pad.pop(n.name or id(n), None)
            if extra is not None:
                pads = [pads[0] + extra[0], pads[1] + extra[1], pads[2] + extra[2], pads[3] + extra[3]]
            if pads[0] != pads[2] or pads[1] != pads[3]:
                raise CertlabError(f"Conv '{n.name}': asymmetric padding {pads} is not supported")
            g = a.get("group", 1)
            conv = nn.Conv2d(W.shape[1] * g, W.shape[0], tuple(k), stride=tuple(a.get("strides", [1, 1])),
                             padding=(pads[0], pads[1]), dilation=tuple(a.get("dilations", [1, 1])), groups=g,
                             bias=len(c) > 2 and c[2] is not None)
            with torch.no_grad():
                conv.weight.copy_(torch.as_tensor(W))
                if conv.bias is not None:
                    conv.bias.copy_(torch.as_tensor(c[2]))
            mods.append(conv)
            return out
        if op == "BatchNormalization":
            C = c[1].size
            rank = 2 if self.flat.get(n.input[0], False) else self.rank.get(n.input[0], 4)
            eps = a.get("epsilon", 1e-5)
            bn = nn.BatchNorm2d(C, eps=eps) if rank == 4 else nn.BatchNorm1d(C, eps=eps)
            with torch.no_grad():
                for p, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), c[1:5]):
                    p.copy_(torch.as_tensor(v))
            mods.append(bn.eval())
            return out
        if op == "AveragePool":
            pads = a.get("pads", [0, 0, 0, 0])
            if pads[0] != pads[2] or pads[1] != pads[3] or a.get("ceil_mode", 0):
                raise CertlabError(f"AveragePool '{n.name}': asymmetric padding or ceil_mode is not supported")
            mods.append(nn.AvgPool2d(tuple(a["kernel_shape"]), tuple(a.get("strides", a["kernel_shape"])),
                                     (pads[0], pads[1]), count_include_pad=bool(a.get("count_include_pad", 0))))
            return out
        if op in ("Sub", "Div", "Mul", "Add"):
            k = [x for x in c if x is not None]
            if len(k) != 1:
                raise CertlabError(f"{op} '{n.name}': only a value {op} a constant is supported")
            v, first = k[0], n.input[0] in self.consts
            if op in ("Sub", "Div") and first:
                raise CertlabError(f"{op} '{n.name}': only (value {op} constant) is supported")
            if op == "Div" and (v == 0).any():
                raise CertlabError(f"Div '{n.name}': division by a constant that contains 0")
            one, zero = np.ones_like(v), np.zeros_like(v)
            with np.errstate(divide="ignore"):
                a, b = {"Sub": (one, -v), "Div": (1.0 / np.where(v == 0, 1, v), zero), "Mul": (v, zero),
                        "Add": (one, v)}[op]
            full, flat = self.full.get(n.input[int(first)]), self.flat.get(n.input[int(first)], False)
            if full is None:
                raise CertlabError(f"{op} '{n.name}': the shape of its input is unknown")
            try:
                a, b = np.broadcast_to(a, full), np.broadcast_to(b, full)
                if np.broadcast_shapes(v.shape, full) != tuple(full):
                    raise ValueError
            except ValueError:
                raise CertlabError(f"{op} '{n.name}': a constant of shape {v.shape} that changes the value's shape "
                                   f"{full}") from None
            shape = (-1,) if flat else full[1:]
            mods.append(_Affine(a.reshape(shape), b.reshape(shape), flat, f"{op} '{n.name}'"))
            return out
        if op in LAYOUT:
            return self.layout(n, mods)
        if op == "Pad":
            mode = a.get("mode", b"constant")
            pads = c[1] if len(c) > 1 else a.get("pads")
            value = c[2] if len(c) > 2 and c[2] is not None else a.get("value", 0.0)
            if mode not in (b"constant", "constant") or np.any(np.asarray(value) != 0) or pads is None:
                raise CertlabError(f"Pad '{n.name}': only a zero constant pad (folded into the next Conv) is supported")
            pads = [int(p) for p in np.asarray(pads).ravel()]
            r = len(pads) // 2
            if r != 4 or any(pads[i] or pads[i + r] for i in (0, 1)):
                raise CertlabError(f"Pad '{n.name}': only padding of the spatial axes of an image is supported")
            nxt = self.cons.get(out, [])
            if len(nxt) != 1 or nxt[0].op_type != "Conv":
                raise CertlabError(f"Pad '{n.name}': a zero Pad is supported only right before a Conv")
            self.pending_pad[nxt[0].name or id(nxt[0])] = (pads[2], pads[3], pads[6], pads[7])
            return out
        raise CertlabError(f"ONNX op {op} ('{n.name}') is not supported")  # pragma: no cover


def _linear(W, b):
    lin = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(np.array(W, dtype=np.float64)))
        lin.bias.copy_(torch.as_tensor(np.array(b, dtype=np.float64)))
    return lin


def load_onnx(path) -> nn.Sequential:
    """An ``nn.Sequential`` (eval mode) computing the ONNX graph at ``path``; CertlabError listing the unsupported
    ops when the graph uses any."""
    onnx, _, _ = _onnx()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CertlabError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - onnx raises several types on garbage
        raise CertlabError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0][:200]}") from None
    bad = sorted({n.op_type for n in model.graph.node} - IMPORTED)
    if bad:
        first = next(n for n in model.graph.node if n.op_type == bad[0])
        raise UnsupportedLayerError(f"{path} uses ONNX ops certlab cannot bound: {', '.join(bad)} (first: {bad[0]} "
                                    f"node '{first.name or first.output[0]}'); supported: {', '.join(sorted(IMPORTED))}")
    r = _Reader(model)
    mods = []
    v, j = r.walk(r.input, mods)
    if j is not None or v != r.output:
        raise CertlabError("the ONNX graph does not reduce to a chain of supported layers")
    return nn.Sequential(*_merge(_resolve(mods))).float().eval()


def _merge(mods):
    """Fuse consecutive Normalize layers ((x − m1)/s1 − m2)/s2 = (x − (m1 + m2·s1)) / (s1·s2) when shapes agree."""
    out = []
    for m in mods:
        if isinstance(m, cnn.Residual):
            m.body = nn.Sequential(*_merge(list(m.body))) if isinstance(m.body, nn.Sequential) else m.body
        prev = out[-1] if out else None
        if isinstance(m, cnn.Normalize) and isinstance(prev, cnn.Normalize):
            m1, s1, m2, s2 = prev.mean, prev.std, m.mean, m.std
            if m1.numel() == 1 or m2.numel() == 1 or m1.numel() == m2.numel():
                out[-1] = cnn.Normalize((m1 + m2 * s1).tolist(), (s1 * s2).expand_as(m1 + m2 * s1).tolist())
                continue
        out.append(m)
    return out


class _Affine(nn.Module):
    """x ↦ a ⊙ x + b (a, b of the per-sample ONNX shape); only lives until :func:`_resolve` replaces it."""

    def __init__(self, a, b, flat, where):
        super().__init__()
        self.a, self.b, self.flat, self.where = np.asarray(a, np.float64), np.asarray(b, np.float64), flat, where

    def then(self, o):
        return _Affine(o.a * self.a, o.a * self.b + o.b, self.flat, self.where)


def _per_channel(t, flat):
    """The per-channel (vector: per-feature) values of t, or None when t varies otherwise."""
    if t.size == 1 or np.all(t == t.reshape(-1)[0]):
        return t.reshape(-1)[:1]
    if flat or t.ndim <= 1:
        return t.reshape(-1)
    if t.ndim == 3 and np.all(t == t[:, :1, :1]):
        return t[:, 0, 0]
    return None


def _resolve(mods):
    """Replace every _Affine by a Normalize or fold it into the neighbouring Linear layer (module docstring)."""
    out = []
    for m in mods:
        if isinstance(m, cnn.Residual):
            for name in ("body", "shortcut"):
                br = getattr(m, name)
                if isinstance(br, nn.Sequential):
                    setattr(m, name, nn.Sequential(*_resolve(list(br))))
        if isinstance(m, _Affine) and out and isinstance(out[-1], _Affine):
            out[-1] = out[-1].then(m)
            continue
        out.append(m)
    res = []
    for i, m in enumerate(out):
        if not isinstance(m, _Affine):
            res.append(m)
            continue
        a, b = _per_channel(m.a, m.flat), _per_channel(m.b, m.flat)
        if a is not None and b is not None and np.all(a > 0):
            if a.size != b.size:
                a, b = np.broadcast_arrays(a, b)
            res.append(cnn.Normalize((-b / a).tolist(), (1.0 / a).tolist()))
            continue
        j = i + 1
        while j < len(out) and isinstance(out[j], (nn.Flatten, nn.Identity, nn.Dropout)):
            j += 1
        if j < len(out) and isinstance(out[j], nn.Linear) and out[j].in_features == m.a.size:
            lin = out[j]
            with torch.no_grad():
                W = lin.weight.double()
                A, Bv = torch.as_tensor(m.a.reshape(-1)), torch.as_tensor(m.b.reshape(-1))
                lin.bias.copy_(lin.bias.double() + W @ Bv)
                lin.weight.copy_(W * A)
            continue
        if res and isinstance(res[-1], nn.Linear) and res[-1].out_features == m.a.size:
            lin = res[-1]
            with torch.no_grad():
                A, Bv = torch.as_tensor(m.a.reshape(-1)), torch.as_tensor(m.b.reshape(-1))
                lin.weight.copy_(lin.weight.double() * A[:, None])
                lin.bias.copy_(lin.bias.double() * A + Bv)
            continue
        raise UnsupportedLayerError(f"{m.where}: an elementwise constant that is neither per-channel (with a positive "
                                    "scale) nor next to a Linear layer cannot be imported")
    return res
