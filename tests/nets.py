"""Random small networks for the bound tests (built only from layers the engine supports)."""

import torch
from torch import nn

import certlab


def mlp(seed, widths=(4, 8, 8, 3), bn=False, residual=False, normalize=False, scale=1.0, relu=True):
    g = torch.Generator().manual_seed(seed)
    layers = []
    if normalize:
        layers.append(certlab.nn.Normalize([0.3] * widths[0], [0.7] * widths[0]))
    for i in range(len(widths) - 2):
        if residual and widths[i] == widths[i + 1]:
            body = nn.Sequential(nn.Linear(widths[i], widths[i + 1]), nn.ReLU(), nn.Linear(widths[i + 1], widths[i + 1]))
            layers += [certlab.nn.Residual(body), nn.ReLU()]
        else:
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if bn:
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            if relu:
                layers.append(nn.ReLU())
    layers.append(nn.Linear(widths[-2], widths[-1]))
    model = nn.Sequential(*layers)
    _randomize(model, g, scale)
    return model.eval()


def cnn(seed, bn=False, residual=False, normalize=False, pool=False, channels=1, size=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    layers = []
    if normalize:
        layers.append(certlab.nn.Normalize([0.5] * channels, [0.25] * channels))
    layers += [nn.Conv2d(channels, 4, 3, stride=1, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers.append(nn.ReLU())
    if residual:
        body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        layers += [certlab.nn.Residual(body), nn.ReLU()]
    layers += [nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), nn.ReLU()]
    out = (size + 1) // 2
    if pool:
        layers.append(nn.AvgPool2d(2, 1))
        out -= 1
    layers += [nn.Flatten(), nn.Linear(6 * out * out, 10), nn.ReLU(), nn.Linear(10, classes)]
    model = nn.Sequential(*layers)
    _randomize(model, g, 1.0)
    return model.eval()


def _randomize(model, g, scale):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * scale * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def threat_for(kind, x, eps, seed=0, k=3):
    if kind == "linf":
        return certlab.LinfBall(eps)
    if kind == "l2":
        return certlab.L2Ball(eps)
    g = torch.Generator().manual_seed(seed)
    if kind == "box":  # an asymmetric per-feature box around x (some sides flat), cut to [0, 1]
        u = torch.rand((2, *x.shape), generator=g) * (torch.rand((2, *x.shape), generator=g) > 0.1)
        return certlab.Box((x - eps * u[0]).clamp(min=0), (x + eps * u[1]).clamp(max=1))
    d = torch.randn((k, *x.shape[1:]), generator=g)
    return certlab.SegmentUnion(d, eps, domain=(0.0, 1.0))


def pgd_extremes(model, x, threat, steps=40, restarts=2, seed=0):
    """Points of the set that (locally) maximise and minimise every output: [2*K*restarts, B, *in]."""
    g = torch.Generator().manual_seed(seed)
    K = model(x[:1]).shape[1]
    lo, hi = threat.interval_hull(x)
    step = ((hi - lo).amax() / 8).item() + 1e-6
    pts = []
    for k in range(K):
        for sign in (1.0, -1.0):
            for _ in range(restarts):
                z = threat.sample(x, 1, generator=g)[0].clone()
                for _ in range(steps):
                    z.requires_grad_(True)
                    out = model(z)[:, k].sum() * sign
                    (grad,) = torch.autograd.grad(out, z)
                    with torch.no_grad():
                        z = threat.project(z + step * grad.sign(), x)
                pts.append(z.detach())
    return torch.stack(pts)
