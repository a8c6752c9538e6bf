"""Recorded fusion outputs: the reference the fusion core must reproduce after any refactor.

Every zoo model is fused under each alignment x repair setting from two (or three) unrelated
seeded copies, and the result is fingerprinted:

* the permutations of ``FusionReport.perms`` exactly (index lists);
* every floating tensor of the fused state dict by three numbers in float64: ``sum(t)``,
  ``sum(t * w)`` with a fixed non-periodic weight ``w_i = sin(0.7 i + 1)`` (a moved entry changes
  it), and ``sum(|t|)``, the scale the first two are compared at (relative ``RTOL``);
* a few small models' fused state dicts in full (``FULL_TENSORS``).

Record (from the code the outputs must match) with ``python -m tests.regression.fusion_cases``
(``--only NAME ...``: just those models' cases, e.g. a newly added zoo model; ``--setting NAME
...``: just those settings' cases, for an intended change of one setting's behaviour);
``tests/test_fusion_regression.py`` re-runs every case and compares.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fxfuse
import models
from fxfuse.align import ActivationMatching, WeightMatching
from fxfuse.passes import FusionReport
from fxfuse.repair import Repair, ResetBatchNorm
from fxfuse.testing import randomize_constants

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "fusion_regression.json"
TENSORS = GOLDEN.with_name("fusion_regression_tensors.pt")
RTOL = 1e-6
FULL_TENSORS = ("mlp", "layernorm_mlp", "flatten_net", "grouped_conv", "tied_block_net")


def cpu_golden() -> Path:
    """Cases recorded again on a CPU whose float kernels (``torch.backends.cpu``'s capability:
    AVX2, AVX512, ...) break near-ties differently (activation matching among units that are
    dead on the data): those cases' record for this capability, read over the main one."""
    cap = torch.backends.cpu.get_cpu_capability()
    return GOLDEN.with_name(f"fusion_regression.{cap}.json")


def record_cpu(cases: set[str]) -> None:
    """Record ``cases`` ("name/setting") for this CPU's capability (:func:`cpu_golden`), for
    cases whose permutations differ here only by near-ties (check that first)."""
    torch.set_num_threads(1)
    path = cpu_golden()
    golden = json.loads(path.read_text()) if path.exists() else {"rtol": RTOL, "cases": {}}
    for case in sorted(cases):
        name, setting = case.split("/", 1)
        state, perms = run_case(name, setting)
        golden["cases"][case] = {"perms": perms, "state": fingerprint(state)}
        print(f"recorded {case} for {path.name}", file=sys.stderr)
    path.write_text(json.dumps(golden, indent=0, sort_keys=True) + "\n")


def unrelated(name: str, seed: int) -> nn.Module:
    """Zoo model ``name`` with every parameter redrawn from ``seed`` at the layer's scale and every
    constant tensor (norm affines, running statistics) made channel-distinct."""
    model = models.get(name).factory()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * max(float(p.std()), 0.1))
    return randomize_constants(model, seed=seed + 100)


def batches(name: str, n: int = 3) -> list[torch.Tensor]:
    """``n`` data batches of 8 samples shaped like the model's example input."""
    (x,) = models.get(name).example_inputs()
    gen = torch.Generator().manual_seed(7)
    shape = (8, *x.shape[1:])
    if x.is_floating_point():
        return [torch.randn(shape, generator=gen) for _ in range(n)]
    return [torch.randint(0, 64, shape, generator=gen) for _ in range(n)]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


Setting = Callable[[list[torch.Tensor]], dict[str, Any]]
SETTINGS: dict[str, tuple[int, Setting]] = {
    # name: (number of models, fuse() keyword arguments given the data)
    "none": (2, lambda d: {"align": None}),
    "weight": (2, lambda d: {"align": WeightMatching()}),
    "weight-exact": (2, lambda d: {"align": WeightMatching(tol=0)}),
    "weight-3": (3, lambda d: {"align": WeightMatching()}),
    "weight-uneven": (2, lambda d: {"align": WeightMatching(), "weights": [0.3, 0.7]}),
    "activation": (2, lambda d: {"align": ActivationMatching(data=d)}),
    "weight+repair": (2, lambda d: {"align": WeightMatching(), "repair": Repair(data=d)}),
    "activation+repair": (2, lambda d: {"align": ActivationMatching(data=d),
                                        "repair": Repair(data=d)}),
    "weight+reset-bn": (2, lambda d: {"align": WeightMatching(), "repair": ResetBatchNorm(data=d)}),
}


def cases() -> list[tuple[str, str]]:
    """(model, setting) pairs: every zoo model under every setting that applies to it."""
    out = []
    for name in models.names():
        tracer_is_fx = fxfuse.find_groups(models.get(name).factory(),
                                          models.get(name).example_inputs()).tracer
        for setting in SETTINGS:
            if "activation" in setting and tracer_is_fx != "torch.fx.symbolic_trace":
                continue  # activation matching on torch.export graphs came after this record
            if "reset-bn" in setting and not has_batchnorm(models.get(name).factory()):
                continue
            out.append((name, setting))
    return out


def run_case(name: str, setting: str) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """The fused state dict and the report's permutations for one case."""
    n, kwargs = SETTINGS[setting]
    inputs = models.get(name).example_inputs()
    nets = [unrelated(name, seed=11 * k + 1) for k in range(n)]
    report = FusionReport()
    fused = fxfuse.fuse(nets, inputs, progress=False, report=report, **kwargs(batches(name)))
    perms = [None if p is None else {g: v.tolist() for g, v in sorted(p.items())}
             for p in (report.perms or [])]
    return fused.state_dict(), perms


def fingerprint(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    out = {}
    for key, t in state.items():
        if not t.is_floating_point():
            out[key] = [float(t.double().sum())]
            continue
        flat = t.detach().double().reshape(-1)
        w = torch.sin(0.7 * torch.arange(flat.numel(), dtype=torch.float64) + 1.0)
        out[key] = [float(flat.sum()), float((flat * w).sum()), float(flat.abs().sum())]
    return out


def record(only: set[str] | None = None, settings: set[str] | None = None) -> None:
    """Record every case, or with ``only`` / ``settings`` just those models' / settings' cases,
    keeping the others as they are recorded (for a newly added zoo model: its cases, without
    re-running the rest)."""
    torch.set_num_threads(1)
    golden: dict[str, Any] = {"rtol": RTOL, "cases": {}}
    tensors: dict[str, dict[str, torch.Tensor]] = {}

    def chosen(name: str, setting: str) -> bool:
        return (only is None or name in only) and (settings is None or setting in settings)

    if only is not None or settings is not None:
        golden = json.loads(GOLDEN.read_text())
        tensors = torch.load(TENSORS, weights_only=True)
        for case in [c for c in golden["cases"] if chosen(*c.split("/", 1))]:
            del golden["cases"][case]
            tensors.pop(case, None)
    for name, setting in cases():
        if not chosen(name, setting):
            continue
        state, perms = run_case(name, setting)
        golden["cases"][f"{name}/{setting}"] = {"perms": perms, "state": fingerprint(state)}
        if name in FULL_TENSORS:
            tensors[f"{name}/{setting}"] = {k: v.clone() for k, v in state.items()}
        print(f"recorded {name}/{setting}", file=sys.stderr)
    GOLDEN.write_text(json.dumps(golden, indent=0, sort_keys=True) + "\n")
    torch.save(tensors, TENSORS)


if __name__ == "__main__":
    # python -m tests.regression.fusion_cases [--only NAME ...] [--setting NAME ...]
    # python -m tests.regression.fusion_cases --cpu NAME/SETTING ...   (this CPU's record)
    if sys.argv[1:2] == ["--cpu"]:
        record_cpu(set(sys.argv[2:]))
        sys.exit(0)
    chosen: dict[str, set[str]] = {}
    flag = None
    for arg in sys.argv[1:]:
        if arg in ("--only", "--setting"):
            flag = arg
            chosen[flag] = set()
        elif flag is None:
            sys.exit(f"unexpected argument {arg!r}: use --only NAME ... and/or --setting NAME ...")
        else:
            chosen[flag].add(arg)
    unknown = chosen.get("--setting", set()) - set(SETTINGS)
    if unknown:
        sys.exit(f"unknown setting(s) {sorted(unknown)}: one of {', '.join(SETTINGS)}")
    record(chosen.get("--only"), chosen.get("--setting"))
