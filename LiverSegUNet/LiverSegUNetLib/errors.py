"""The exceptions LiverSegUNet raises on purpose: one family, each with a message a user can act on."""


class LiverSegError(Exception):
    """Base of every error this package raises for bad input, bad weights or cancellation."""


class InputError(LiverSegError):
    """The input image or folder cannot be used (not found, not a CT volume, inconsistent series)."""


class WeightsError(LiverSegError):
    """A model file is missing, malformed or does not match its recorded checksum."""


class Cancelled(LiverSegError):
    """The run was cancelled by the caller before it finished."""
