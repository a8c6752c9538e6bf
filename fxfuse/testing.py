"""Helpers for testing permutation specs on a model: randomised constants and layer coverage.

At initialisation many tensors are constant across channels (BatchNorm weight 1, bias 0, running
statistics 0/1, LayerNorm affine, layer scale); a wrong permutation of them would go unseen.
:func:`randomize_constants` makes every such tensor channel-distinct so a test can fail.
"""

from __future__ import annotations

import torch
from torch import nn

from .groups.spec import PermutationSpec


def randomize_constants(model: nn.Module, seed: int = 0) -> nn.Module:
    """In place: give every floating parameter/buffer whose entries are all equal random values.

    Variances (``running_var``) are drawn from ``U(0.5, 1.5)``; other constant tensors get
    ``value + 0.3 * N(0, 1)``.  Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point() or t.numel() < 2:
                continue
            flat = t.detach().reshape(-1)
            if not torch.all(flat == flat[0]):
                continue
            if name.endswith("running_var"):
                new = torch.rand(t.shape, generator=gen) + 0.5
            else:
                new = flat[0].cpu() + 0.3 * torch.randn(t.shape, generator=gen)
            t.copy_(new.to(t.dtype))
    return model


def uncovered_layers(model: nn.Module, spec: PermutationSpec) -> list[str]:
    """Hidden Linear/Conv layers whose output axis is in no group (layers producing a model
    output are exempt: outputs are never permuted)."""
    missing = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        a = spec.axes.get((f"{name}.weight" if name else "weight", 0))
        if a is None or a.groups or a.size < 2:
            continue
        if any(r.startswith("output:") for r in a.fixed_because):
            continue
        missing.append(f"{name}: {'; '.join(a.fixed_because)}")
    return missing
