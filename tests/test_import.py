"""``import fxfuse`` stays light: no heavy or optional library is loaded until it is used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Loaded only by the code that needs them (lazy imports).
HEAVY = ("scipy", "networkx", "onnx", "onnxruntime", "onnxscript", "transformers", "ot",
         "sklearn", "captum", "pygmtools", "flwr", "safetensors")


def loaded_after(code: str) -> list[str]:
    """The HEAVY top-level modules in ``sys.modules`` after running ``code`` in a fresh process."""
    probe = (f"{code}\nimport sys, json\n"
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_fxfuse_loads_no_heavy_library() -> None:
    assert loaded_after("import fxfuse") == []


def test_the_cli_parser_loads_no_heavy_library() -> None:
    # `fxfuse --help` and bad-input errors must be fast: building the parser imports nothing heavy
    assert loaded_after("import fxfuse.cli; fxfuse.cli.make_parser()") == []


def test_the_probe_sees_a_lazy_import_when_it_happens() -> None:
    # the check above can fail: using a feature that needs networkx loads it
    code = ("import torch, fxfuse\n"
            "spec = fxfuse.find_groups(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),"
            " torch.nn.Linear(4, 2)), torch.randn(2, 3))\n"
            "spec.to_graph()")
    assert "networkx" in loaded_after(code)
