"""Fast-Lin / COAP: back-substitution with parallel lines, lower slope = upper slope = u/(u−l).

This is the dual bound of Wong & Kolter 2018 ("Provable defenses against adversarial examples via the convex outer
adversarial polytope") and Fast-Lin (Weng et al. 2018). Intermediate bounds by the same relaxation.
"""

from certlab.bounds import backsub


def intermediate(g, x, threat, **_):
    return backsub.intermediate(g, x, threat, lower="parallel")


def compute(g, x, threat, lower_only=False, **_):
    pre = intermediate(g, x, threat)
    return backsub.output(g, x, threat, pre, lower="parallel", lower_only=lower_only)
