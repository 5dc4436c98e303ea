"""CROWN / DeepPoly: back-substitution with the adaptive lower slope a = 1[u > −l] for crossing ReLUs.

Intermediate (pre-activation) bounds are also computed by CROWN, layer by layer (intersected with IBP's).
Zhang et al. 2018, "Efficient Neural Network Robustness Certification with General Activation Functions";
Singh et al. 2019, "An Abstract Domain for Certifying Neural Networks" (DeepPoly).
"""

from certlab.bounds import backsub


def intermediate(g, x, threat, **_):
    return backsub.intermediate(g, x, threat, lower="adaptive")


def compute(g, x, threat, lower_only=False, **_):
    pre = intermediate(g, x, threat)
    return backsub.output(g, x, threat, pre, lower="adaptive", lower_only=lower_only)
