"""Reference model zoo for fxfuse: small random-init architectures plus a registry.

>>> from models import get, names
>>> entry = get("resnet20")
>>> model = entry.factory()
>>> out = model(*entry.example_inputs())
"""

from __future__ import annotations

from . import zoo
from .registry import ZOO, ModelEntry, get, names

__all__ = ["ZOO", "ModelEntry", "get", "names", "zoo"]
