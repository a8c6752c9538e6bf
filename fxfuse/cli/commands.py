"""The subcommands' work: ``groups``, ``fuse``, ``select``, ``scopes``, ``demo``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .io import (
    build_model,
    check_data_fits,
    check_finite,
    check_runs,
    load_data,
    load_weights,
    staged_outputs,
    write_graph,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


# --- commands -----------------------------------------------------------------------------------


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    if not args.input_shape:
        raise InputError("give the model's input shape, e.g. --input-shape 2,3,32,32 (repeat "
                         "--input-shape for several inputs)")
    return tuple(s.tensor(seed=i) for i, s in enumerate(args.input_shape))


def cmd_groups(args: argparse.Namespace) -> int:
    from .. import find_groups, verify

    inputs = _inputs(args)
    model = build_model(args.model, args.factory_args)
    if args.weights:
        load_weights(model, args.weights)
        if args.verify:
            check_finite(model, args.weights, "--weights",
                         "--verify compares outputs, which needs finite weights: fix that file")
    check_runs(model, inputs, args.input_shape)
    spec = find_groups(model, inputs, strict=args.strict)
    print(spec)
    if args.verify:
        result = verify(model, spec, inputs)
        print(f"verify: ok, {result.n_groups} groups permuted at random, outputs unchanged "
              f"(relative max difference {result.max_rel_diff:.2g})")
    outputs = [p for p in (args.json, args.graph) if p is not None]
    with staged_outputs(outputs) as staged:
        files = dict(zip(outputs, staged))
        if args.json:
            files[args.json].write_text(spec.to_json())
        if args.graph:
            write_graph(spec.to_graph(), files[args.graph])
    for p in outputs:
        print(f"wrote {p}")
    return 0


def _checkpoint_models(args: argparse.Namespace, inputs: tuple[torch.Tensor, ...]
                       ) -> list[nn.Module]:
    """One MODEL per CHECKPOINT (``--factory-args`` once for all or once per checkpoint), its
    weights loaded and checked finite; model 0 must run on the inputs."""
    models = []
    kwargs = args.factory_args if isinstance(args.factory_args, list) else [args.factory_args]
    for i, path in enumerate(args.checkpoints):
        model = build_model(args.model, kwargs[i] if len(kwargs) > 1 else kwargs[0])
        load_weights(model, path, label="CHECKPOINT")
        check_finite(model, path, "CHECKPOINT", "fix or drop that checkpoint")
        models.append(model)
    check_runs(models[0], inputs, args.input_shape)
    return models


def cmd_fuse(args: argparse.Namespace) -> int:
    from .. import export, fuse
    from ..passes import FusionReport

    if len(args.checkpoints) < 2:
        raise InputError("give at least two CHECKPOINTs to fuse, e.g. A.pt B.pt")
    inputs = _inputs(args)
    models = _checkpoint_models(args, inputs)
    data = load_data(args.data) if args.data else []
    if data:
        check_data_fits(data, args.input_shape[0], args.data)
    align = _method_config("align", args.align, {"tol": args.tol} if args.tol is not None else {})
    repair = _method_config("repair", args.repair, {})
    report = FusionReport()
    fused = fuse(models, inputs, align=align, repair=repair, progress=not args.quiet,
                 report=report, data=data or None, target=args.target)
    print(report)
    result = export(fused, inputs, args.out, dynamic_batch=not args.static_shapes)
    print(f"wrote {args.out}: {result.summary()}")
    return 0


def cmd_scopes(args: argparse.Namespace) -> int:
    """Per producer layer: each checkpoint's weight scope (mean, std), the fused target scope
    (``fxfuse.weight_scopes``) and the spread across checkpoints; nothing is written."""
    from ..train import weight_scopes

    if len(args.checkpoints) < 2:
        raise InputError("give at least two CHECKPOINTs to compare, e.g. A.pt B.pt")
    inputs = _inputs(args)
    models = _checkpoint_models(args, inputs)
    scopes = weight_scopes(models, inputs, std_rule=args.std_rule)
    print(f"weight scopes (mean / std) of {len(models)} checkpoints, {len(scopes.layers)} "
          f"producer layers; fused target: mean of means, std rule {args.std_rule!r}")
    head = ["layer", "shape", *(f"CHECKPOINT {k}" for k in range(len(models))), "fused",
            "mean spread", "std spread"]
    rows = [head]
    worst = ("", -1.0)
    mismatch = scopes.mismatch()
    for key, target in scopes.layers.items():
        d_mean, d_std = mismatch[key]
        rel = d_std / target.std if target.std > 0 else float("inf")
        worst = (key, rel) if rel > worst[1] else worst
        rows.append([key, "x".join(map(str, scopes.shapes[key])),
                     *(f"{m[key].mean:+.4f} / {m[key].std:.4f}" for m in scopes.per_model),
                     f"{target.mean:+.4f} / {target.std:.4f}", f"{d_mean:.4f}",
                     f"{d_std:.4f} ({100 * rel:.1f}%)"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"largest std mismatch: {worst[0]} (spread {100 * worst[1]:.1f}% of the target std)")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """Build the models, fit the selector on ``--data`` (one file per checkpoint: model k's own
    samples, tagged with source k), print the report, export the router as one ONNX file."""
    import torch

    from .. import adaptive_selection, export
    from ..combine import Confidence, Density, Entropy, Gate

    if len(args.checkpoints) < 2:
        raise InputError("give at least two CHECKPOINTs to route between, e.g. A.pt B.pt")
    inputs = _inputs(args)
    n = len(args.checkpoints)
    refs = args.model * n if len(args.model) == 1 else args.model
    fargs = args.factory_args or [None]
    fargs = fargs * n if len(fargs) == 1 else fargs
    models = []
    for ref, fa, path in zip(refs, fargs, args.checkpoints):
        try:
            model = build_model(ref, fa)
        except InputError as exc:
            raise InputError(f"--model: {exc}") from exc
        load_weights(model, path, label="CHECKPOINT")
        check_finite(model, path, "CHECKPOINT", "fix or drop that checkpoint")
        check_runs(model, inputs, args.input_shape)
        models.append(model)
    per_model = len(args.data) == n
    batches: list[Any] = []
    for k, source in enumerate(args.data):
        part = load_data(source, args.max_samples)
        check_data_fits(part, args.input_shape[0], source)
        for b in part:
            x, y = b if isinstance(b, tuple) else (b, None)
            s = torch.full((x.shape[0],), k, dtype=torch.int64) if per_model else None
            batches.append((x, y, s))
    selector: Confidence | Density | Gate
    if args.selector in ("confidence", "entropy"):
        kind = Confidence if args.selector == "confidence" else Entropy
        selector = kind(calibrate=not args.no_calibrate,
                        calibrate_on=args.calibrate_on or "pooled")
    elif args.selector == "gate":
        selector = Gate(target=args.gate_target)
    else:
        selector = Density(space=args.density_space or "features")
    router = adaptive_selection(models, inputs[0], batches or None, selector)
    print(router.report)
    result = export(router.eval(), inputs, args.out, dynamic_batch=not args.static_shapes)
    print(f"wrote {args.out}: {result.summary()}; every model runs on every sample in ONNX")
    return 0


def _method_config(stage: str, name: str, params: dict[str, Any]) -> Any:
    """The config of the registered method ``name`` of ``stage`` (None for "none")."""
    from ..methods import config_from_dict

    return None if name == "none" else config_from_dict({"method": name, **params})


def _method_choices(stage: str) -> list[str]:
    from ..methods import methods

    return [m.name for m in methods(stage)] + ["none"]


def _needs_data(stage: str, name: str) -> bool:
    from ..methods import methods

    return any(m.name == name and m.needs_data for m in methods(stage))


def _method_help(stage: str) -> str:
    from ..methods import methods

    return "; ".join(f"{m.name}: {m.summary}" for m in methods(stage))


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(out=str(args.out), epochs=args.epochs, width=args.width, quiet=args.quiet)
