"""Typed errors.  Every message says what went wrong, where, and what to do about it."""

from __future__ import annotations


class FxFuseError(Exception):
    """Root of every error fxfuse raises on purpose."""


class InputError(FxFuseError, ValueError):
    """The arguments given to fxfuse are not usable (wrong type, shape, file, ...)."""


class TraceError(FxFuseError):
    """The model could not be traced into a torch.fx graph."""


class UnsupportedOpError(FxFuseError):
    """Strict mode: an op without an axis rule was met (message names op, node, source line)."""


class SpecError(FxFuseError, ValueError):
    """A permutation spec does not fit the model, or its JSON is malformed."""


class PermutationError(FxFuseError, ValueError):
    """A permutation given for a group is not a permutation of the group's size."""


class VerificationError(FxFuseError):
    """Permuting the discovered groups changed the model's outputs (details in the message)."""


class ExportError(FxFuseError):
    """A model could not be exported, or the written file does not reproduce its outputs."""


class ArchitectureMismatchError(FxFuseError, ValueError):
    """Models given to fuse do not share one architecture (message names the first difference)."""


class PipelineError(FxFuseError):
    """A fusion pass failed or its preconditions were not met (message names the pass)."""
