"""certlab: sound bounds, certified and adversarial training, attacks, verification and robustness studies."""

__version__ = "0.1.0"

from certlab.errors import CertlabError, UnsupportedLayerError, InputError, DataError, CheckpointError  # noqa: F401
from certlab import nn  # noqa: F401
from certlab.threat import LinfBall, L2Ball, SegmentUnion  # noqa: F401
from certlab import bounds  # noqa: F401,E402  (callable module: certlab.bounds(model, x, threat, ...))
from certlab.bounds import METHODS, Bounds, margins, certify  # noqa: F401,E402
from certlab.verify.radius import certified_radius, average_certified_radius  # noqa: F401,E402
from certlab import attacks  # noqa: F401,E402
from certlab.evaluation import evaluate  # noqa: F401,E402
from certlab.verify import verify_complete, Result  # noqa: F401,E402
from certlab.interchange import load_onnx  # noqa: F401,E402
