"""Exceptions raised by certlab. All are ``ValueError`` subclasses so callers can catch bad input uniformly."""


class CertlabError(ValueError):
    """Base class: bad input or an unsupported request, with a message that names the problem."""


class UnsupportedLayerError(CertlabError):
    """A module the bound engine cannot relax soundly. The message names its path in the model and its type."""


class InputError(CertlabError):
    """Bad tensors or arguments: wrong shapes, NaN/inf, negative epsilon, points outside the domain."""


class DataError(CertlabError):
    """A dataset file that is missing, truncated, garbled or fails its checksum."""


class CheckpointError(CertlabError):
    """A checkpoint that is corrupt, foreign or incompatible."""
