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


def run_code(code: str) -> str:
    """The last line ``code`` prints, run in a fresh process from the repository root."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_discovery_alone_loads_no_alignment_code() -> None:
    # fxfuse's public names are imported on first use: find_groups needs discovery only
    code = ("import sys, torch, fxfuse\n"
            "fxfuse.find_groups(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), "
            "torch.nn.Linear(4, 2)), torch.randn(2, 3))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('fxfuse.align', "
            "'fxfuse.repair', 'fxfuse.combine', 'fxfuse.depth', 'fxfuse.passes', "
            "'fxfuse.exporter'))))")
    assert run_code(code) == "[]"


def test_the_functions_fuse_and_permute_are_not_replaced_by_their_modules() -> None:
    # loading fxfuse/fuse.py (here before anything else) sets fxfuse.fuse to the module unless
    # the package keeps the function
    code = ("import fxfuse.fuse, fxfuse.permute, fxfuse.cli, fxfuse\n"
            "print(callable(fxfuse.fuse), callable(fxfuse.permute), "
            "type(fxfuse.fuse).__name__, fxfuse.fuse.__module__)")
    assert run_code(code) == "True True function fxfuse.fuse"


def test_every_public_name_and_submodule_resolves() -> None:
    code = ("import sys, fxfuse\n"
            "missing = [n for n in fxfuse.__all__ if getattr(fxfuse, n, None) is None]\n"
            "print(missing, fxfuse.trace.__name__, 'find_groups' in dir(fxfuse), "
            "hasattr(fxfuse, 'bench'), 'fxfuse.bench' in sys.modules)")
    # an optional submodule is an attribute once imported, as before: probing does not load it
    assert run_code(code) == "[] fxfuse.trace True False False"
    bad = ("import fxfuse\n"
           "try:\n    fxfuse.no_such_name\nexcept AttributeError as e:\n    print(e)")
    assert run_code(bad) == "module 'fxfuse' has no attribute 'no_such_name'"


def test_methods_by_name_register_the_built_in_ones_in_their_order() -> None:
    # a recipe names methods: their modules load on lookup; the built-in ones are listed first
    # (alignment, then repair) whichever module was imported first
    code = ("import fxfuse\n"
            "fxfuse.ResetBatchNorm\n"
            "from fxfuse.methods import methods\n"
            "r = fxfuse.recipe_from_json('{\"align\": {\"method\": \"weight\"}, "
            "\"repair\": {\"method\": \"reset-bn\"}}')\n"
            "print([type(v).__name__ for v in r.values()], [m.name for m in methods()])")
    assert run_code(code) == (
        "['WeightMatching', 'ResetBatchNorm'] ['weight', 'activation', 'ot', 'graph', "
        "'neuron-interpolation', 'reset-bn', 'repair']")


def test_a_method_replacing_a_built_in_one_keeps_its_place() -> None:
    code = ("import dataclasses, fxfuse\n"
            "from fxfuse.methods import methods\n"
            "@dataclasses.dataclass(frozen=True)\n"
            "class MyAlign:\n    pass\n"
            "fxfuse.register_method('weight', 'align', MyAlign, lambda c: [])\n"
            "fxfuse.register_method('mine', 'align', MyAlign, lambda c: [])\n"
            "print([(m.name, m.config.__name__) for m in methods('align')][:1], "
            "methods('align')[-1].name)")
    assert run_code(code) == "[('weight', 'MyAlign')] mine"
