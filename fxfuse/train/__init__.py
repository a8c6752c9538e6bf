"""Training-time helpers that make models easier to fuse later (regularisers a user adds to their
own loss).  :mod:`.scopes`: weight scope alignment (WSA, Xu et al. 2024)."""

from __future__ import annotations

from .scopes import STD_RULES, Scope, WeightScopeRegularizer, WeightScopes, weight_scopes

__all__ = ["STD_RULES", "Scope", "WeightScopeRegularizer", "WeightScopes", "weight_scopes"]
