"""certlab.evaluation.evaluate: keys, ranges and the ordering clean ≤ robust (attacks) ≤ certified error."""

import pytest
import torch
from torch import nn

from certlab import data as cdata
from certlab.errors import CertlabError
from certlab.evaluation import evaluate, format_table
from certlab.threat import L2Ball, LinfBall, SegmentUnion


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained for a few hundred steps on linsep (clean accuracy well above chance)."""
    torch.manual_seed(0)
    tr = cdata.load("linsep", "train", d=6, n=300, margin=1.0, sigma=0.7, seed=0)
    te = cdata.load("linsep", "test", d=6, n=300, margin=1.0, sigma=0.7, seed=0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(tr.x), tr.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), te


def test_keys_ranges_and_ordering(trained):
    model, te = trained
    res = evaluate(model, te, LinfBall(0.3, domain=None), certify=("ibp", "crown"), attacks=("pgd", "apgd-ce"),
                   batch_size=128, acr=True)
    for k in ("n", "clean_error", "robust_error", "certified_error", "acr", "unstable_relus", "time_s"):
        assert k in res
    assert res["n"] == 300
    assert 0 <= res["clean_error"] <= res["robust_error"] <= 1
    for m in ("ibp", "crown"):
        # sound certificates: a certified sample cannot be attacked
        assert res["robust_error"] <= res["certified_error"][m] + 1e-9
        assert 0 <= res["acr"][m] <= 1
    assert res["clean_error"] < 0.2
    assert res["unstable_relus"] > 0
    # certified error at ε is 1 − (fraction with radius ≥ ε): consistent with the ACR being < 1 when errors exist
    if res["certified_error"]["crown"] > 0:
        assert res["acr"]["crown"] < 1
    # clean error agrees with a direct computation
    with torch.no_grad():
        direct = float((model(te.x).argmax(1) != te.y).float().mean())
    assert res["clean_error"] == pytest.approx(direct)
    assert "clean err" in format_table([{"name": "m", **res}])


def test_zero_eps_certifies_exactly_the_correct_points(trained):
    model, te = trained
    res = evaluate(model, te, L2Ball(0.0, domain=None), certify=("crown",), attacks=(), acr=False, n=100)
    assert res["n"] == 100 and res["robust_error"] is None and res["acr"] is None
    assert res["certified_error"]["crown"] == pytest.approx(res["clean_error"])
    assert res["unstable_relus"] == 0


def test_bigger_eps_is_never_easier(trained):
    model, te = trained
    errs = [evaluate(model, te, LinfBall(e, domain=None), certify=("ibp",), attacks=(), acr=False)["certified_error"]["ibp"]
            for e in (0.05, 0.2, 0.5)]
    assert errs[0] <= errs[1] <= errs[2]


def test_segments_with_per_sample_directions_and_callable_threat():
    torch.manual_seed(0)
    te = cdata.load("spheres", "test", d=5, n=120, margin=0.5, seed=0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    dirs = cdata.signal_directions(te)  # [N, 1, d] radial directions for the whole set
    whole = evaluate(model, te, SegmentUnion(dirs, 0.1), certify=("ibp", "crown"), attacks=("apgd-ce",),
                     batch_size=50, acr=False)
    per_batch = evaluate(model, te, lambda x: SegmentUnion(cdata.signal_directions("spheres", x=x), 0.1),
                         certify=("ibp", "crown"), attacks=("apgd-ce",), batch_size=50, acr=False)
    for k in ("clean_error", "robust_error", "certified_error", "unstable_relus"):
        assert whole[k] == per_batch[k]
    assert whole["robust_error"] <= min(whole["certified_error"].values()) + 1e-9


def test_bad_input(trained):
    model, te = trained
    with pytest.raises(CertlabError, match="unknown attack"):
        evaluate(model, te, LinfBall(0.1, domain=None), attacks=("fgsm-9000",))
    with pytest.raises(CertlabError, match="unknown bound method"):
        evaluate(model, te, LinfBall(0.1, domain=None), certify=("magic",), attacks=())
    with pytest.raises(CertlabError, match="n must be"):
        evaluate(model, te, LinfBall(0.1, domain=None), attacks=(), n=0)
    with pytest.raises(CertlabError, match="threat"):
        evaluate(model, te, 0.1, attacks=())
