"""Input gradients for the attacks, with the faster CPU kernel for each convolution's backward.

On CPU PyTorch has two kernels for the input gradient of a convolution (a transposed convolution): oneDNN's and
its own. On the CPU builds we measured, oneDNN's is several times slower when the gradient flows into few channels
(the first layer of an MNIST network: 8.0 ms against 2.1 ms at batch 128), while PyTorch's own kernel loops over
the samples and loses on wide layers. Three policies compute the same sums:

- ``on``: oneDNN for every convolution; ``off``: for none;
- ``mixed``: PyTorch's kernel for convolutions with at most :data:`FEW_CHANNELS` input channels, oneDNN for the
  rest. The forward pass leaves a hook on each convolution's output that sets the flag just before that
  convolution's backward runs (the autograd engine runs CPU nodes one at a time, in order).

Each policy is timed once per (model, input shape, dtype), on the first batch seen, and the fastest kept, like
``cudnn.benchmark``. The flag is process-global while a backward runs and restored afterwards: do not run attacks
in several threads at once.
"""

from __future__ import annotations

import contextlib
import time
import weakref

import torch

FEW_CHANNELS = 2
POLICIES = ("on", "off", "mixed")

_CHOICE = weakref.WeakKeyDictionary()  # model -> {(per-sample input shape, dtype): policy}; forgotten with the model
_active = {"policy": None}  # the policy of the backward now running (None: leave the flag alone)


def _set_flag(enabled: bool) -> None:
    try:
        torch.backends.mkldnn.enabled = enabled
    except RuntimeError:  # the flags were frozen (torch.backends.disable_global_flags): leave them alone
        pass


def _wants_onednn(conv, policy: str) -> bool:
    return policy == "on" or (policy == "mixed" and conv.in_channels > FEW_CHANNELS)


def _forward_hook(conv, inputs, out):
    if isinstance(out, torch.Tensor) and out.requires_grad:
        def before_backward(grad, conv=conv):
            if _active["policy"] is not None:
                _set_flag(_wants_onednn(conv, _active["policy"]))
        out.register_hook(before_backward)


def _applies(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.backends.mkldnn.is_available()


@contextlib.contextmanager
def recording(model, x: torch.Tensor):
    """Run the attack's forward pass inside this block so that :func:`input_grad` can pick the kernel of each
    convolution's backward."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)] \
        if _applies(x) and isinstance(model, torch.nn.Module) else []
    handles = [c.register_forward_hook(_forward_hook) for c in convs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _grad(loss, xv, policy, retain=False):
    prev = torch.backends.mkldnn.enabled
    _active["policy"] = policy
    _set_flag(policy != "off")
    try:
        return torch.autograd.grad(loss, xv, retain_graph=retain, allow_unused=True)[0]
    finally:
        _active["policy"] = None
        _set_flag(prev)


def input_grad(model, loss, xv):
    """d loss / d xv, with the backward's convolution kernels chosen as above (the forward ran in
    :func:`recording`; without it the ``mixed`` policy behaves like ``on``)."""
    if not _applies(xv):
        return torch.autograd.grad(loss, xv, allow_unused=True)[0]
    try:
        choices = _CHOICE.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: time the policies for this call only
        choices = {}
    key = (tuple(xv.shape[1:]), xv.dtype)
    policy = choices.get(key)
    if policy is None:
        times = dict.fromkeys(POLICIES, float("inf"))
        for _ in range(2):
            for p in POLICIES:
                t0 = time.perf_counter()
                _grad(loss, xv, p, retain=True)
                times[p] = min(times[p], time.perf_counter() - t0)
        policy = choices[key] = min(POLICIES, key=times.get)
    return _grad(loss, xv, policy)
