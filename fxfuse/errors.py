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


def quote_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` for quoting another library's error inside ours: the message's lines
    joined into one, shortened to about ``limit`` characters at a word boundary (never mid-word)
    with ``...`` marking the cut."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if len(text) > limit:
        cut = text.rfind(" ", 0, limit + 1)
        if cut < limit // 2:  # one very long word (a path, say): keep it whole
            cut = text.find(" ", limit) if text.find(" ", limit) != -1 else len(text)
        if cut < len(text):
            text = text[:cut].rstrip(" ,;:") + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def listing(items: list[str] | tuple[str, ...], limit: int = 10) -> str:
    """``'a', 'b', ... and 12 more`` for an error message: at most ``limit`` items, and how many
    more there are; ``none`` when empty."""
    if not items:
        return "none"
    shown = ", ".join(repr(k) for k in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
