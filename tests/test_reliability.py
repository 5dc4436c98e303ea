"""Defects found by random testing (issue 26): BatchNorm without running statistics, and complete verifiers that
overran their timeout."""

import threading
import time

import pytest
import torch
from scipy.optimize import OptimizeResult
from torch import nn

import certlab
from nets import mlp
from certlab.errors import UnsupportedLayerError
from certlab.verify import milp
from certlab.verify.complete import verify_any, verify_complete


# -- BatchNorm without running statistics ------------------------------------------------------------------------
def _bn_nets():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3))
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    return [(dense.eval(), torch.rand(4, 4), "BatchNorm1d"), (conv.eval(), torch.rand(4, 1, 5, 5), "BatchNorm2d")]


@pytest.mark.parametrize("case", [0, 1])
def test_batchnorm_without_running_statistics_is_refused_everywhere(case):
    """In eval mode such a layer normalises with the batch's statistics: a sample's logits depend on the other
    samples, so no per-sample bound or certificate exists. Every bound and every complete method refuses it with
    one line naming the layer (the MILP raised torch's ValueError, the LP answered "unknown" where CROWN certified)."""
    model, x, kind = _bn_nets()[case]
    y = model(x).argmax(1)
    th = certlab.LinfBall(0.01)
    msg = rf"layer '1' \({kind}\) has no running statistics .*depends on the other samples"
    for call in (lambda: certlab.bounds(model, x, th, method="crown"),
                 lambda: certlab.certify(model, x, y, th, "crown"),
                 lambda: certlab.margins(model, x, y, th, method="ibp"),
                 lambda: verify_any(model, x, y, th, "crown"),
                 *[lambda m=m: verify_complete(model, x, y, th, m, timeout=5) for m in ("milp", "lp", "bab")]):
        with pytest.raises(UnsupportedLayerError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)


def test_batchnorm_without_running_statistics_in_train_mode():
    """In train mode every BatchNorm uses the batch's statistics: bounds are those of the clean batch's map (what a
    training loss needs), as with running statistics. The complete verifiers verify the eval-mode model: refused."""
    model, x, _ = _bn_nets()[0]
    model.train()
    y = model(x).argmax(1)
    th = certlab.LinfBall(0.01)
    assert certlab.certify(model, x, y, th, "crown").shape == (4,)
    for m in ("milp", "lp", "bab"):
        with pytest.raises(UnsupportedLayerError, match="no running statistics"):
            verify_complete(model, x, y, th, m, timeout=5)
    assert model.training


def test_batchnorm_with_running_statistics_but_tracking_switched_off():
    """track_running_stats=False set after the buffers exist: torch's eval forward still uses the running
    statistics, and so must the bounds (they used the batch's, bounding another function)."""
    model = mlp(3, widths=(4, 10, 10, 3), bn=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    th = certlab.LinfBall(0.05)
    b = certlab.bounds(model, x, th, method="crown")
    with torch.no_grad():
        out = model(th.sample(x, 200).reshape(-1, 4)).reshape(200, 6, 3)
    assert (out >= b.lower - 1e-5).all() and (out <= b.upper + 1e-5).all()
    y = model(x).argmax(1)
    cert = certlab.certify(model, x, y, th, "crown")
    for b, r in enumerate(milp.verify(model, x, y, th, timeout=10)):  # the MILP verifies the same function
        assert r.status != "unknown" and (r.status == "verified" or not cert[b])
        if r.status == "falsified":
            assert int(model(r.counterexample.unsqueeze(0)).argmax(1)[0]) != int(y[b])


# -- timeouts ----------------------------------------------------------------------------------------------------
def _hard():
    """A sample of a random 100-300-300-300-10 MLP (~110 unstable ReLUs at this radius) that CROWN does not certify,
    no attack falsifies, and no complete method decides in a few seconds."""
    model = mlp(0, (100, 300, 300, 300, 10))
    x = torch.rand(1, 100, generator=torch.Generator().manual_seed(1))
    return model, x, model(x).argmax(1), certlab.LinfBall(0.01)


def _timed(model, x, y, th, method, timeout, **kw):
    t0 = time.perf_counter()
    r = verify_complete(model, x, y, th, method, timeout=timeout, **kw)
    return time.perf_counter() - t0, r[0]


@pytest.mark.parametrize("method,kw", [("milp", {}), ("lp", {"refine": True}), ("bab", {"iters": 400})])
def test_timeout_is_honoured_on_an_undecided_sample(method, kw):
    """Within 1 s of the timeout, and "unknown": BaB's screening (CROWN, APGD) counts against it and its
    per-round bounding stops at the deadline; the MILP and LP solvers get the time left."""
    model, x, y, th = _hard()
    verify_complete(model, x, y, th, method, timeout=0.2, **kw)  # first calls pay for imports and warm-up
    elapsed, r = _timed(model, x, y, th, method, 2.0, **kw)
    assert elapsed <= 3.0, f"{method} took {elapsed:.2f} s with a 2 s timeout"
    assert r.status == "unknown" and r.time <= 3.0


@pytest.fixture
def overrunning_highs(monkeypatch):
    """HiGHS that overruns its time_limit by 5 s (it does not look at the clock everywhere: during cut separation
    at the root it overran 2 s by 0.7 s on a 784-300-300-300 MLP), then reports "time limit reached"."""
    stop = threading.Event()

    def slow(*args, options=None, **kwargs):
        stop.wait(options["time_limit"] + 5.0)
        return OptimizeResult(status=1, x=None, fun=None, mip_dual_bound=None, mip_node_count=0,
                              message="Time limit reached")

    monkeypatch.setattr(milp, "_milp", slow)
    monkeypatch.setattr(milp, "_linprog", slow)
    yield
    stop.set()
    lock = getattr(milp, "_SOLVER", None)  # let the abandoned run end before the next test solves
    if lock is not None:
        assert lock.acquire(timeout=10)
        lock.release()


@pytest.mark.parametrize("method,kw", [("milp", {"attack": False}), ("lp", {}), ("bab", {"leaf_milp": 10 ** 6})])
def test_a_solver_that_overruns_its_time_limit_is_abandoned(overrunning_highs, method, kw):
    """The MILP, the LP and BaB's leaf MILPs return within 1 s of the timeout even when the solver does not."""
    model = mlp(0, (20, 100, 100, 100, 10))
    x = torch.rand(1, 20, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    th = certlab.LinfBall(0.035)
    assert not certlab.certify(model, x, y, th, "crown")[0]  # the solver is needed
    elapsed, r = _timed(model, x, y, th, method, 1.0, **kw)
    assert elapsed <= 2.0, f"{method} took {elapsed:.2f} s with a 1 s timeout"
    assert r.status == "unknown"
