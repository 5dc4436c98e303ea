"""Verification: certified radii (``radius``), complete verifiers (``milp``, ``bab``, the ``lp`` relaxation) behind
``verify_complete``, relaxation ``diagnostics``, and the ``certify``/``diagnose``/``export`` commands (``cli``)."""

from certlab.verify.complete import verify_any, verify_complete  # noqa: F401
from certlab.verify.result import Result  # noqa: F401
