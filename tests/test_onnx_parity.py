"""ONNX parity checked from outside the exporter: the written file, loaded in ONNX Runtime by the
test itself, against the PyTorch model; and the exporter's own check must reject a file that
computes something else (a check that compared the reference with itself would pass it)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from fxfuse.errors import ExportError
from fxfuse.exporter import export
from fxfuse.fuse import fuse
from fxfuse.testing import randomize_constants

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _torch_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(*inputs)
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def _ort_outputs(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Run the file as written, in a fresh ONNX Runtime session; inputs fed by position."""
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), names
    feeds = {n: x.numpy() for n, x in zip(names, inputs)}
    return [torch.as_tensor(o) for o in session.run(None, feeds)]


def _max_rel(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    assert len(ref) == len(got)
    worst = 0.0
    for r, g in zip(ref, got):
        assert tuple(r.shape) == tuple(g.shape)
        worst = max(worst, float((r.double() - g.double()).abs().max() / r.double().abs().max()))
    return worst


def _fused_vgg_bn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import fxfuse

    entry = models.get("vgg_bn")
    a = randomize_constants(entry.factory(), seed=3)
    inputs = entry.example_inputs()
    spec = fxfuse.find_groups(a, inputs)
    b = randomize_constants(entry.factory(), seed=4)
    b = fxfuse.permute(b, spec, spec.random_perms(seed=1))
    return fuse([a, b], inputs, progress=False), inputs


CASES = {name: (lambda name=name: (randomize_constants(models.get(name).factory(), seed=2),
                                   models.get(name).example_inputs()))
         for name in ("resnet20", "llama_lm")}
CASES["fused vgg_bn"] = _fused_vgg_bn


@pytest.mark.parametrize("case", list(CASES))
def test_written_onnx_file_matches_torch(case: str, tmp_path: Path) -> None:
    """Measured: relative max difference 1.1e-7 to 2.9e-7; asserted 2e-6."""
    model, inputs = CASES[case]()
    target = tmp_path / "m.onnx"
    export(model, inputs, target, check=False)  # the exporter's own check plays no part here
    diff = _max_rel(_torch_outputs(model, inputs), _ort_outputs(target, inputs))
    assert diff < 2e-6, f"{case}: ONNX Runtime differs from torch by {diff:.3g}"


def test_export_check_rejects_a_file_that_differs(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.onnx.export is made to write the network with every parameter scaled by 1.5: the
    exporter's check must see that the file does not compute the model, raise, and publish
    nothing."""
    entry = models.get("mlp")
    model, inputs = randomize_constants(entry.factory(), seed=2), entry.example_inputs()
    real_export = torch.onnx.export

    def export_a_different_model(m: nn.Module, *args, **kwargs):  # type: ignore[no-untyped-def]
        other = copy.deepcopy(m)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.5)
        return real_export(other, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_a_different_model)
    with pytest.raises(ExportError, match="does not match"):
        export(model, inputs, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    export(model, inputs, tmp_path / "m.onnx")  # the same call passes with the real exporter
