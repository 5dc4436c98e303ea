"""Adversarial attacks over certlab threat sets: PGD, APGD-CE/-DLR/-T (Croce & Hein 2020) on ℓ∞/ℓ2 balls, and the
exact line search on unions of segments.

    x_adv = certlab.attacks.run(model, x, y, threat, method="apgd-ce")
    err = certlab.attacks.robust_error(model, x, y, threat)          # BoolTensor [B]
"""

from certlab.attacks.api import DEFAULT_STEPS, METHODS, attack_success, robust_error, run  # noqa: F401
from certlab.attacks.base import margin  # noqa: F401
