"""The small core that walks a model: it turns a supported ``nn.Module`` into a graph of affine ops, ReLUs and
additions, and validates the inputs of every bound call.

The graph is a list of nodes in topological order. Node 0 is the input. ``affine`` nodes carry an
:class:`~certlab.bounds.ops.AffineOp`; ``relu`` nodes apply max(0, ·) elementwise; ``add`` nodes sum two nodes
(``certlab.nn.Residual``). Every node records ``name`` (its path in the model) and ``shape`` (per sample).

BatchNorm becomes a per-channel affine map: with its running statistics in eval mode, and with the statistics of the
current batch (the ones the forward pass uses) in train mode, computed from the batch's clean forward values.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from certlab.bounds.ops import AffineOp, ChannelAffineOp, ConvOp, LinearOp, ReshapeOp
from certlab.bounds.spec import margin_table
from certlab.errors import InputError, UnsupportedLayerError
from certlab import nn as cnn
from certlab.threat import ThreatSet

SUPPORTED = (
    "Sequential, Linear, Conv2d, ReLU, Flatten, BatchNorm1d, BatchNorm2d, AvgPool2d, Identity, Dropout, "
    "certlab.nn.Normalize, certlab.nn.Residual"
)


def _precision_switches() -> list:
    """torch's float32 precision switches of the kernels bounds use: cuBLAS matmul and cuDNN conv (TF32 on NVIDIA
    GPUs from Ampere on; cuDNN's is on by default) and oneDNN matmul and conv (bf16 on CPUs that have it). Newer torch
    has one ``fp32_precision`` attribute per switch; older torch only the two ``allow_tf32`` flags."""
    b = torch.backends
    if hasattr(b.cudnn, "conv") and hasattr(b.cudnn.conv, "fp32_precision"):
        return [(o, "fp32_precision", "ieee") for o in (b.cuda.matmul, b.cudnn.conv, b.mkldnn.matmul, b.mkldnn.conv)]
    return [(b.cuda.matmul, "allow_tf32", False), (b.cudnn, "allow_tf32", False)]


_CALLER_PRECISION = 0  # > 0 inside caller_precision()


@contextlib.contextmanager
def caller_precision():
    """Inside this block :func:`exact_float32` leaves the caller's precision settings alone (TF32 convolutions stay
    TF32: 1.2–1.7× faster bounds on CNN7 on an H100). For bounds that certify nothing, such as a training loss's;
    never around a certificate."""
    global _CALLER_PRECISION
    _CALLER_PRECISION += 1
    try:
        yield
    finally:
        _CALLER_PRECISION -= 1


@contextlib.contextmanager
def exact_float32():
    """Runs the block with full-precision float32 matmuls and convolutions, then restores the caller's settings.

    A sound bound needs arithmetic whose error is that of float32 (unit roundoff 2⁻²⁴): the rounding check of
    :mod:`certlab.bounds.rounding` is drawn at about 170 units of it. TF32 keeps 10 mantissa bits (unit roundoff
    2⁻¹¹, 4,000 times larger) and bf16 7, and torch uses TF32 for cuDNN convolutions by default, so a bound computed
    on a GPU with the defaults could be off by more than that line."""
    if _CALLER_PRECISION:
        yield
        return
    saved = []
    try:
        for obj, attr, value in _precision_switches():
            saved.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def float32_exact(fn):
    """Decorator: ``fn`` runs under :func:`exact_float32`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with exact_float32():
            return fn(*args, **kwargs)

    return wrapper


@dataclass
class Node:
    kind: str  # "input" | "affine" | "relu" | "add"
    inputs: tuple = ()
    op: AffineOp | None = None
    name: str = ""
    shape: tuple = ()


@dataclass
class Graph:
    nodes: list = field(default_factory=list)
    output_value: torch.Tensor | None = None  # model output at the centre (only when computed on the full batch)

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    @property
    def relus(self) -> list:
        return [i for i, n in enumerate(self.nodes) if n.kind == "relu"]

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv_out(where, kind, size, k, stride, pad, dil=(1, 1)):
    """Spatial output size of a convolution / pooling window (floor mode)."""
    out = tuple((n + 2 * p - d * (kk - 1) - 1) // s + 1 for n, kk, s, p, d in zip(size, k, stride, pad, dil))
    if min(out) < 1:
        raise InputError(f"layer '{where}' ({kind}): input of size {tuple(size)} is smaller than its window")
    return out


_BASES = (nn.Sequential, cnn.Residual, nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d,
          nn.AvgPool2d, nn.Identity, nn.Dropout, cnn.Normalize)
_OWN_FORWARD = object()  # marks a layer whose forward is not its supported class's (we cannot see what it does)
_BASE_CACHE = weakref.WeakKeyDictionary()  # layer type -> supported base class (types made at run time may go)


def _base_of(m: nn.Module):
    """The supported layer class m is an instance of, None when there is none, or _OWN_FORWARD when a subclass or
    the instance itself overrides forward. The class lookup is cached per type (this runs for every layer on every
    bound call); the forward checks are not, so a forward patched later is still caught."""
    t = type(m)
    base = _BASE_CACHE.get(t, _BASES)
    if base is _BASES:
        base = _BASE_CACHE[t] = next((b for b in _BASES if isinstance(m, b)), None)
    if base is not None and (t.forward is not base.forward or "forward" in m.__dict__):
        return _OWN_FORWARD
    return base


class _Builder:
    """Walks a model, appending its nodes to a graph. ``val`` is the model's value at the input (a tensor), or None
    when only shapes are tracked (then no forward pass runs: output shapes follow from the layers' arithmetic)."""

    def __init__(self, graph: Graph, like: torch.Tensor):
        self.g, self.like = graph, like  # like: dtype and device of new constants

    def walk(self, m: nn.Module, path: str, idx: int, val, shape: tuple):
        """Append the nodes of module m applied to node idx (per-sample shape ``shape``, value ``val`` or None).
        Returns (idx, val, shape) of the result."""
        where = path or "<model>"
        base = _base_of(m)
        if base is None:
            raise UnsupportedLayerError(
                f"layer '{where}' of type {type(m).__name__} is not supported by the bound engine; supported: {SUPPORTED}"
            )
        if base is _OWN_FORWARD:
            raise UnsupportedLayerError(
                f"layer '{where}' ({type(m).__name__}) overrides forward(); the bound engine supports {SUPPORTED}"
            )
        if getattr(m, "_forward_hooks", None) or getattr(m, "_forward_pre_hooks", None):
            raise UnsupportedLayerError(
                f"layer '{where}' ({type(m).__name__}) has forward hooks, which may change what it computes (e.g. the "
                "old torch.nn.utils.spectral_norm); the bound engine cannot see them: remove them before bounding"
            )
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and t.is_floating_point() and (t.dtype != self.like.dtype or t.device != self.like.device):
                raise InputError(
                    f"layer '{where}' ({type(m).__name__}) holds {t.dtype} tensors on {t.device} but x is {self.like.dtype} "
                    f"on {self.like.device}; convert one of them (e.g. model.to(x.dtype), x.to(device))"
                )
        sub = (lambda n: f"{path}.{n}" if path else n)
        if base is nn.Sequential:
            for name, child in m.named_children():
                idx, val, shape = self.walk(child, sub(name), idx, val, shape)
            return idx, val, shape
        if base is cnn.Residual:
            a, va, sa = self.walk(m.body, sub("body"), idx, val, shape)
            b, vb, sb = self.walk(m.shortcut, sub("shortcut"), idx, val, shape)
            if sa != sb:
                raise InputError(f"residual '{where}': body gives {sa} but shortcut gives {sb}")
            if a == idx and b == idx:
                two = ChannelAffineOp(self.like.new_tensor(2.0), self.like.new_tensor(0.0), shape)
                return self._affine(two, where, idx, val, shape)
            return self.g.add(Node("add", (a, b), None, where, sa)), (None if val is None else va + vb), sa
        if base is nn.Identity or base is nn.Dropout:
            return idx, val, shape
        if base is nn.ReLU:
            return self.g.add(Node("relu", (idx,), None, where, shape)), (None if val is None else torch.relu(val)), shape
        if base is nn.Linear:
            if len(shape) != 1 or shape[0] != m.in_features:
                raise InputError(f"layer '{where}' (Linear) expects {m.in_features} features but receives shape {shape}")
            return self._affine(LinearOp(m.weight, m.bias), where, idx, val, (m.out_features,))
        if base is nn.Flatten:
            if m.start_dim != 1 or m.end_dim != -1:
                raise UnsupportedLayerError(f"layer '{where}' (Flatten) must flatten from dim 1 to -1")
            n = 1
            for s in shape:
                n *= s
            return self._affine(ReshapeOp(shape, (n,)), where, idx, val, (n,))
        if base is nn.Conv2d:
            if len(shape) != 3 or shape[0] != m.in_channels:
                raise InputError(f"layer '{where}' (Conv2d) expects [{m.in_channels}, H, W] but receives shape {shape}")
            if m.padding_mode != "zeros":
                raise UnsupportedLayerError(f"layer '{where}' (Conv2d) uses padding_mode={m.padding_mode!r}; only 'zeros'")
            padding = m.padding
            if isinstance(padding, str):
                if padding != "valid":
                    raise UnsupportedLayerError(f"layer '{where}' (Conv2d) uses padding={padding!r}; give explicit numbers")
                padding = (0, 0)
            stride, padding, dilation = _pair(m.stride), _pair(padding), _pair(m.dilation)
            out = (m.out_channels, *_conv_out(where, "Conv2d", shape[1:], _pair(m.kernel_size), stride, padding, dilation))
            op = ConvOp(m.weight, m.bias, stride, padding, dilation, m.groups, shape, out)
            return self._affine(op, where, idx, val, out)
        if base is nn.AvgPool2d:
            if len(shape) != 3:
                raise InputError(f"layer '{where}' (AvgPool2d) expects [C, H, W] but receives shape {shape}")
            pad = _pair(m.padding)
            if m.ceil_mode or m.divisor_override is not None or (not m.count_include_pad and any(pad)):
                raise UnsupportedLayerError(
                    f"layer '{where}' (AvgPool2d) with ceil_mode, divisor_override or count_include_pad=False is not supported"
                )
            k = _pair(m.kernel_size)
            if any(p > kk // 2 for p, kk in zip(pad, k)):
                raise UnsupportedLayerError(f"layer '{where}' (AvgPool2d): padding {pad} exceeds half the window {k}")
            stride = _pair(m.stride if m.stride is not None else m.kernel_size)
            C = shape[0]
            w = self.like.new_full((C, 1, k[0], k[1]), 1.0 / (k[0] * k[1]))
            out = (C, *_conv_out(where, "AvgPool2d", shape[1:], k, stride, pad))
            return self._affine(ConvOp(w, None, stride, pad, (1, 1), C, shape, out), where, idx, val, out)
        if base is nn.BatchNorm1d or base is nn.BatchNorm2d:
            want = 3 if isinstance(m, nn.BatchNorm2d) else (1, 2)
            if (len(shape) != want if isinstance(want, int) else len(shape) not in want) or shape[0] != m.num_features:
                raise InputError(f"layer '{where}' ({type(m).__name__}) expects {m.num_features} channels, receives shape {shape}")
            if m.training or not m.track_running_stats:  # the batch's statistics: the walk needs the values
                if val is None:
                    raise _NeedValues
                if m.training and val.shape[0] < 2:
                    raise InputError("BatchNorm in train mode needs a batch of at least 2 samples; call model.eval() first")
                dims = [0] + list(range(2, val.dim()))
                mean = val.mean(dims)
                var = val.var(dims, unbiased=False)
            else:
                mean, var = m.running_mean, m.running_var
            scale = torch.rsqrt(var + m.eps)
            if m.weight is not None:
                scale = scale * m.weight
            shift = -mean * scale
            if m.bias is not None:
                shift = shift + m.bias
            return self._affine(ChannelAffineOp(scale, shift, shape), where, idx, val, shape)
        if base is cnn.Normalize:
            if m.mean.numel() > 1 and m.mean.numel() != shape[0]:
                raise InputError(f"layer '{where}' (Normalize) has {m.mean.numel()} channels but receives shape {shape}")
            return self._affine(ChannelAffineOp(1.0 / m.std, -m.mean / m.std, shape), where, idx, val, shape)
        raise AssertionError("unreachable")  # pragma: no cover

    def _affine(self, op, where, idx, val, shape):
        if val is not None:  # with values, shapes are the computed ones (tests compare them to the arithmetic)
            val = op.fwd(val)
            shape = tuple(val.shape[1:])
        return self.g.add(Node("affine", (idx,), op, where, shape)), val, shape


class _NeedValues(Exception):
    """Raised by a walk without values that meets a layer whose map depends on the batch (BatchNorm statistics)."""


def _walk(model, x, with_values: bool):
    g = Graph()
    g.add(Node("input", (), None, "<input>", tuple(x.shape[1:])))
    _, out, _ = _Builder(g, x).walk(model, "", 0, x if with_values else None, tuple(x.shape[1:]))
    return g, out


def build_graph(model: nn.Module, x: torch.Tensor, full: bool = False) -> Graph:
    """The graph of ``model`` for inputs shaped like ``x`` ([B, *input_shape]).

    A forward pass runs only on the whole batch, when BatchNorm uses batch statistics or ``full`` is asked for
    (otherwise the nodes' shapes follow from the layers' arithmetic); then ``g.output_value`` holds the model's
    output at x (its logits, computed by the graph's ops, with the caller's grad mode; BatchNorm running statistics
    are not updated).
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(getattr(nn.modules.module, h, None) for h in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        raise UnsupportedLayerError(
            "global module forward hooks are registered (torch.nn.modules.module.register_module_forward_hook), which "
            "may change what every layer computes; the bound engine cannot see them: remove them before bounding"
        )
    # the ops hold parameters (and BatchNorm's folded scale/shift) with the caller's grad mode, so bounds stay
    # differentiable in every parameter; without values no forward pass runs (shapes follow from the layers), and a
    # BatchNorm that uses the batch's statistics restarts the walk with them
    try:
        g, out = _walk(model, x, full)
    except _NeedValues:
        g, out, full = *_walk(model, x, True), True
    if full:
        g.output_value = out
    if len(g.nodes) == 1:  # an identity model: keep one node so the output is not the input
        g.add(Node("affine", (0,), ReshapeOp(tuple(x.shape[1:]), tuple(x.shape[1:])), "<identity>", tuple(x.shape[1:])))
    return g


def validate(model, x, threat) -> None:
    if not isinstance(threat, ThreatSet):
        raise InputError("threat must be a certlab.threat set (LinfBall, L2Ball, SegmentUnion, Box), "
                         f"got {type(threat).__name__}")
    threat.validate(x)


def all_finite(t: torch.Tensor) -> bool:
    """True when t holds no NaN or ±inf. One reduction (aminmax propagates NaN, and ±inf shows in the min or the
    max) instead of isfinite's four elementwise kernels and an ``all``."""
    if t.numel() == 0:
        return True
    mn, mx = torch.aminmax(t.detach())
    return math.isfinite(mn.item()) and math.isfinite(mx.item())


def output_dim(g: Graph) -> int:
    s = g.nodes[-1].shape
    if len(s) != 1:
        raise InputError(f"the model's output must be a vector of logits per sample, got shape {s}")
    return s[0]


def check_spec(C, B: int, K: int, like: torch.Tensor) -> torch.Tensor | None:
    """Return C as [B, S, K] on like's device, or raise InputError."""
    if C is None:
        return None
    if not isinstance(C, torch.Tensor):
        raise InputError(f"C must be a tensor [B, S, K] or [S, K], got {type(C).__name__}")
    if C.dim() == 2:
        C = C.unsqueeze(0).expand(B, -1, -1)
    if C.dim() != 3 or C.shape[0] != B or C.shape[2] != K:
        raise InputError(f"C must have shape [B={B}, S, K={K}] or [S, K={K}], got {tuple(C.shape)}")
    C = C.to(device=like.device, dtype=like.dtype)
    if not all_finite(C):
        raise InputError("C contains NaN or inf")
    return C


def check_labels(y, B: int, K: int, device) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != B:
        raise InputError(f"y must have shape [{B}], got {tuple(y.shape)}")
    if y.is_floating_point():
        raise InputError("y must hold integer class labels")
    if B and (y.min() < 0 or y.max() >= K):
        raise InputError(f"labels must lie in [0, {K - 1}], got range [{y.min().item()}, {y.max().item()}]")
    return y.to(device=device, dtype=torch.long)


def margin_spec(y: torch.Tensor, K: int, dtype) -> torch.Tensor:
    """C [B, K, K] with row j = e_y − e_j (row y is zero), so C·f gives the margins f_y − f_j."""
    return margin_table(y, K, dtype).dense()
