"""``find_groups``: the public entry point of discovery."""

from __future__ import annotations

from typing import Any

from torch import nn

from .discover import discover
from .spec import PermutationSpec, build_spec


def find_groups(
    model: nn.Module, example_inputs: Any, *, strict: bool = False, tracer: str = "auto"
) -> PermutationSpec:
    """Discover the permutation groups of ``model`` from its torch.fx graph.

    ``example_inputs`` is a tensor or a tuple of tensors the model's ``forward`` accepts.  The model
    is run once (eval mode, no grad; its modes are restored) and never modified.  With
    ``strict=True`` an op without an axis rule raises :class:`~fxfuse.errors.UnsupportedOpError`
    instead of cutting the groups through it.  ``tracer``: ``"auto"`` (``torch.fx.symbolic_trace``,
    falling back to ``torch.export`` for models it can not trace), ``"symbolic"`` or ``"export"``.
    """
    disc = discover(model, example_inputs, strict=strict, tracer=tracer)
    spec = build_spec(disc, type(model).__name__)
    spec.lint(disc.param_shapes)
    return spec
