"""Attacks against the exact answer: on a small trained network no attack succeeds where the MILP proves robustness,
and APGD finds at least 90% of the counterexamples that the MILP shows exist."""

import torch
from torch import nn

import certlab
from certlab.attacks import robust_error, run
from certlab.verify import milp


def _trained():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.3, 0.5, 0.4], [0.5, 0.75, 0.4, 0.6]])
    y = torch.randint(0, 3, (600,), generator=g)
    x = (centres[y] + 0.12 * torch.randn(600, 4, generator=g)).clamp(0, 1)
    model = nn.Sequential(nn.Linear(4, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(300):
        idx = torch.randint(0, 600, (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xt = (centres[y[:60]] + 0.12 * torch.randn(60, 4, generator=g)).clamp(0, 1)
    with torch.no_grad():
        keep = model(xt).argmax(1) == y[:60]
    return model, xt[keep][:40], y[:60][keep][:40]


def test_attacks_agree_with_milp():
    model, x, y = _trained()
    assert x.shape[0] >= 30
    threat = certlab.LinfBall(0.1)
    res = milp.verify(model, x, y, threat, timeout=20, attack=False)
    status = [r.status for r in res]
    assert "unknown" not in status
    robust = torch.tensor([s == "verified" for s in status])
    falsified = ~robust
    assert robust.sum() >= 5 and falsified.sum() >= 5  # a meaningful mix
    for method in ("pgd", "apgd-ce", "apgd-dlr", "apgd-t"):
        adv = run(model, x, y, threat, method=method)
        assert bool(threat.contains(adv, x).all())
        with torch.no_grad():
            hit = model(adv).argmax(1) != y
        assert not (hit & robust).any(), f"{method} claims a counterexample where the MILP proves robustness"
        if method.startswith("apgd"):
            assert hit[falsified].float().mean() >= 0.9, f"{method} finds too few of the MILP counterexamples"
    err = robust_error(model, x, y, threat)
    assert not (err & robust).any() and err[falsified].float().mean() >= 0.9
