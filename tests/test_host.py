"""verify.host.on_cpu: the MILP/LP entry points run on CPU copies when the model or a tensor lives off the CPU.
This machine has no GPU, so the copy path is forced here; tests/test_device.py runs it for real on CUDA."""

import copy

import torch

import certlab
from certlab.verify import host, lp, milp
from certlab.verify.result import Result

from nets import mlp


def test_copy_path_gives_the_same_answers_and_leaves_the_callers_model_alone(monkeypatch):
    model = mlp(5, widths=(4, 8, 8, 3))
    x = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    y = model(x).argmax(1)
    y[2:] = (y[2:] + 1) % 3  # wrong labels: MILP falsifies them at the centre, with a counterexample
    th = certlab.LinfBall(torch.tensor([0.05, 0.1, 0.2, 0.3]))
    direct = [milp.verify(model, x, y, th, timeout=20), milp.exact_bounds(model, x, th),
              lp.verify(model, x, y, th, timeout=20), lp.lp_margins(model, x, y, th)]
    seen = []
    real_deepcopy = copy.deepcopy

    def spy(obj, *a):
        out = real_deepcopy(obj, *a)
        if obj is model:
            seen.append(out)
        return out

    monkeypatch.setattr(host, "_off_cpu", lambda model, tensors: True)
    monkeypatch.setattr(host.copy, "deepcopy", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forced = [milp.verify(model, x, y, th, timeout=20), milp.exact_bounds(model, x, th),
              lp.verify(model, x, y, th, timeout=20), lp.lp_margins(model, x, y, th)]
    assert len(seen) == 4 and all(m is not model for m in seen)  # each call solved on its own copy
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [r.status for r in forced[0]][2:] == ["falsified", "falsified"]
    for a, b in ((direct[0], forced[0]), (direct[2], forced[2])):
        assert [r.status for r in a] == [r.status for r in b]
        for r, s in zip(a, b):
            assert (r.counterexample is None) == (s.counterexample is None)
            if s.counterexample is not None:
                assert torch.equal(r.counterexample, s.counterexample)
    torch.testing.assert_close(forced[1], direct[1])
    torch.testing.assert_close(forced[3], direct[3])


def test_cpu_copy_is_a_deep_copy_with_tied_weights_kept():
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), lin, torch.nn.BatchNorm1d(3))
    model[3].running_mean.fill_(0.5)
    c = host.cpu_copy(model)
    assert c[0] is c[2] and c[0] is not lin
    assert c[0].weight.data_ptr() != lin.weight.data_ptr() and isinstance(c[0].weight, torch.nn.Parameter)
    assert torch.equal(c[3].running_mean, model[3].running_mean)
    c[3].running_mean.zero_()
    assert float(model[3].running_mean[0]) == 0.5


def test_back_moves_tensors_and_counterexamples():
    r = Result("falsified", torch.zeros(3))
    out = host._back((torch.ones(2), [r, Result("verified")]), torch.device("cpu"))
    assert isinstance(out, tuple) and isinstance(out[1], list) and out[1][0] is r
    assert not host._off_cpu(mlp(0, widths=(2, 3)), [torch.zeros(1)])
