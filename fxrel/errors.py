"""Exceptions raised by fxrel. Each names what was wrong so a user can act on it."""


class FxrelError(Exception):
    """Base class of fxrel's errors."""


class CaptureError(FxrelError):
    """The model could not be traced, or is not in a state that can be explained (e.g. training mode)."""


class UnsupportedOpError(FxrelError):
    """A traced node is outside fxrel's closed canonical op set (message names node, target, source line)."""


class RuleError(FxrelError):
    """A rule was assigned to a node it cannot handle, or got invalid parameters."""


class InputError(FxrelError, ValueError):
    """Bad user input: wrong shape, NaN values, class index out of range …"""


class NumericalError(FxrelError, ArithmeticError):
    """A result is not finite; the message names the first relevance-graph node where non-finite values appear."""
