"""``fxfuse groups`` run as a subprocess, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

import fxfuse
import models

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fxfuse", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_groups_on_a_zoo_model_writes_json_and_graph(tmp_path: Path) -> None:
    out = run("groups", "models.zoo:resnet20", "--input-shape", "2,3,32,32", "--verify",
              "--json", str(tmp_path / "spec.json"), "--graph", str(tmp_path / "g.graphml"))
    assert out.returncode == 0, out.stderr
    assert "PermutationSpec for ResNetCifar" in out.stdout and "verify: ok" in out.stdout
    spec = fxfuse.PermutationSpec.from_json((tmp_path / "spec.json").read_text())
    entry = models.get("resnet20")
    assert spec == fxfuse.find_groups(entry.factory(), entry.example_inputs())
    graph = nx.read_graphml(tmp_path / "g.graphml")
    assert any(d["kind"] == "group" for _, d in graph.nodes(data=True))


def test_groups_with_several_inputs_and_dot_graph(tmp_path: Path) -> None:
    out = run("groups", "tests.cli_models:two_inputs", "--input-shape", "2,5:int64",
              "--input-shape", "2,5,4", "--graph", str(tmp_path / "g.dot"))
    assert out.returncode == 0, out.stderr
    assert "mix.weight:1" in out.stdout  # embed + proj feed one group read by mix
    assert (tmp_path / "g.dot").read_text().startswith("graph groups {")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_are_loaded(tmp_path: Path, suffix: str) -> None:
    model = models.get("mlp").factory()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    out = run("groups", "models.zoo:mlp", "--input-shape", "2,1,28,28", "--weights", str(path),
              "--verify")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args,message", [
    (["groups", "not-a-model-string", "--input-shape", "1,3"], "package.module:factory"),
    (["groups", "no_such_pkg.mod:f", "--input-shape", "1,3"], "cannot import module"),
    (["groups", "models.zoo:nope", "--input-shape", "1,3"], "has no attribute"),
    (["groups", "models.zoo:mlp"], "--input-shape"),
    (["groups", "models.zoo:mlp", "--input-shape", "2,x"], "comma-separated integers"),
    (["groups", "models.zoo:mlp", "--input-shape", "2,3,7,7"], "example inputs"),
])
def test_bad_input_exits_2_with_a_clear_message(args: list[str], message: str) -> None:
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_corrupt_or_mismatched_weights_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = run("groups", "models.zoo:mlp", "--input-shape", "2,1,28,28", "--weights", str(bad))
    assert out.returncode == 2 and "could not be read" in out.stderr
    other = tmp_path / "other.pt"
    torch.save(models.get("vgg").factory().state_dict(), other)
    out = run("groups", "models.zoo:mlp", "--input-shape", "2,1,28,28", "--weights", str(other),
              "--json", str(tmp_path / "x.json"))
    assert out.returncode == 2 and "missing keys" in out.stderr
    assert not (tmp_path / "x.json").exists()
