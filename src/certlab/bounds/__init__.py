"""Sound output bounds of a network over a threat set — one module per relaxation, a small core that walks the model.

``certlab.bounds`` is both this package and a function: ``certlab.bounds(model, x, threat, method, C)`` returns
:class:`Bounds`.
"""

import sys
import types

from certlab.bounds.api import (  # noqa: F401
    METHODS, PARAMETRISED, Bounds, bounds as _bounds, certify, margins, relu_bounds, resolve_method,
)
from certlab.bounds.core import build_graph  # noqa: F401


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _bounds(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
