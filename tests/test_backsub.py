"""Fast-Lin's one-pass lower+upper back-substitution equals the two-pass (rows A and −A) computation."""

import pytest
import torch

from certlab.bounds import backsub
from certlab.bounds.core import build_graph

from nets import cnn, mlp, threat_for


@pytest.mark.parametrize("kind", ["linf", "l2", "segments"])
@pytest.mark.parametrize("net", ["cnn", "cnn-bn", "mlp"])
def test_parallel_one_pass_matches_two_passes(kind, net):
    torch.manual_seed(0)
    if net == "mlp":
        model, x = mlp(1, widths=(6, 12, 12, 12, 4)), torch.rand(5, 6)
    else:  # two convolutions: the second one's neurons go through the patches path
        model, x = cnn(2, bn=net == "cnn-bn", size=8), torch.rand(5, 1, 8, 8)
    threat = threat_for(kind, x, 0.3 if kind != "linf" else 0.1)
    g = build_graph(model, x)
    pre, ibp_pre = backsub.intermediate(g, x, threat, lower="parallel")
    B = x.shape[0]
    checked = 0
    for r in g.relus:
        p = g.nodes[r].inputs[0]
        shape = g.nodes[p].shape
        n = int(torch.tensor(shape).prod())
        eye = torch.eye(n).expand(B, n, n).reshape(B, n, *shape)
        # reference: dense rows A and −A, lower bounds only, the earlier layers' bounds as computed
        low = backsub.lower_bound(g, p, torch.cat([eye, -eye], 1), pre, x, threat, "parallel")
        ref_l, ref_u = low[:, :n], -low[:, n:]
        l, u = (t.reshape(B, -1) for t in pre[r])
        il, iu = (t.reshape(B, -1) for t in ibp_pre[r])
        unstable = (il < 0) & (iu > 0)  # only these are refined; the rest keep IBP's bounds
        assert torch.allclose(l[unstable], torch.maximum(il, ref_l)[unstable], atol=1e-5, rtol=1e-5)
        assert torch.allclose(u[unstable], torch.minimum(iu, ref_u)[unstable], atol=1e-5, rtol=1e-5)
        checked += int(unstable.sum())
        # the dense one-pass path too
        lo1, up1 = backsub.both_bounds(g, p, eye, pre, x, threat, "parallel")
        assert torch.allclose(lo1, ref_l, atol=1e-5, rtol=1e-5) and torch.allclose(up1, ref_u, atol=1e-5, rtol=1e-5)
    assert checked > 0  # the comparison covered refined neurons


def test_one_pass_refuses_non_parallel_lines():
    model, x = mlp(0), torch.rand(2, 4)
    g = build_graph(model, x)
    pre, _ = backsub.intermediate(g, x, threat_for("linf", x, 0.1), lower="adaptive")
    A = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="parallel"):
        backsub.lower_bound(g, len(g.nodes) - 1, A, pre, x, threat_for("linf", x, 0.1), "adaptive", upper=True)
