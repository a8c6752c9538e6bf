"""The fusion core reproduces the recorded outputs (tests/regression/fusion_cases.py).

Permutations must match exactly; every fused tensor's fingerprint (sum, a fixed weighted sum)
within ``RTOL`` of its absolute sum; the fully recorded models' tensors within ``RTOL`` relative.
Re-record only when a change of behaviour is intended, and say so in the commit.  A case whose
permutations differ on another CPU's float kernels only where activations tie (dead units) is
recorded for that CPU too (``--cpu``, :func:`~tests.regression.fusion_cases.cpu_golden`).
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pytest
import torch

from tests.regression.fusion_cases import GOLDEN, RTOL, TENSORS, cpu_golden, fingerprint, run_case


@cache
def golden() -> dict[str, Any]:
    cases = json.loads(GOLDEN.read_text())["cases"]
    here = cpu_golden()  # this CPU's records of near-tie cases, where it has any
    if here.exists():
        cases.update(json.loads(here.read_text())["cases"])
    return cases


@cache
def full_tensors() -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(TENSORS, weights_only=True)


@pytest.mark.parametrize("case", sorted(golden()))
def test_fusion_reproduces_the_recorded_output(case: str) -> None:
    name, setting = case.split("/")
    state, perms = run_case(name, setting)
    want = golden()[case]
    assert perms == want["perms"], f"{case}: permutations differ from the recorded ones"
    got = fingerprint(state)
    assert sorted(got) == sorted(want["state"]), f"{case}: state dict keys differ"
    for key, ref in want["state"].items():
        scale = ref[-1] if len(ref) == 3 else abs(ref[0])
        for g, r in zip(got[key], ref):
            assert abs(g - r) <= RTOL * scale + 1e-12, f"{case}: {key} moved ({g} vs {r})"
    if case in full_tensors():
        for key, ref_t in full_tensors()[case].items():
            diff = float((state[key].double() - ref_t.double()).abs().max()) if ref_t.numel() else 0.0
            assert diff <= RTOL * max(float(ref_t.double().abs().max()), 1e-12), (case, key, diff)


def test_every_zoo_model_is_recorded() -> None:
    import models

    recorded = {c.split("/")[0] for c in golden()}
    assert set(models.names()) <= recorded, set(models.names()) - recorded
