"""Typed errors of depth alignment (all :class:`~fxfuse.errors.ArchitectureMismatchError`)."""

from __future__ import annotations

from ..errors import ArchitectureMismatchError


class DepthError(ArchitectureMismatchError):
    """Models of different depth can not be put in correspondence (message names the stage or
    level, and what to do)."""


class NoExactIdentityError(DepthError):
    """A level that would have to be inserted has no exact identity (a post-norm block, a width
    change, an op without an identity rule); the message names the level and the op."""

    why: str = ""  # the reason alone (no advice), for messages that list several blocks
