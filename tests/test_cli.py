"""``fxfuse groups`` run as a subprocess, as a user would."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

import fxfuse
import models
from fxfuse import cli

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
    # the loader the command uses puts exactly the saved tensors into a fresh model
    from fxfuse.cli import load_weights

    fresh = models.get("mlp").factory()
    assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    load_weights(fresh, path, label="--weights")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("args,message", [
    (["groups", "not-a-model-string", "--input-shape", "1,3"], "package.module:factory"),
    (["groups", "no_such_pkg.mod:f", "--input-shape", "1,3"], "cannot import module"),
    (["groups", "models.zoo:nope", "--input-shape", "1,3"], "has no attribute"),
    (["groups", "models.zoo:mlp"], "--input-shape"),
    (["groups", "models.zoo:mlp", "--input-shape", "2,x"], "comma-separated integers"),
    (["groups", "models.zoo:mlp", "--input-shape", "2,3,7,7"], "does not run on --input-shape"),
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


# --- help texts -------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sp for act in parser._actions if isinstance(act, argparse._SubParsersAction)
            for name, sp in act.choices.items()}


def test_every_option_of_every_command_has_help_with_its_default() -> None:
    parser = cli.make_parser()
    commands = _subparsers(parser)
    assert commands
    for name, sp in commands.items():
        assert sp.description, name
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[0] if action.option_strings else action.metavar
            assert action.help and len(action.help) > 20, (name, label)
            if action.option_strings:  # positionals are required by nature
                assert "(default: " in action.help or "(required)" in action.help, (name, label)
            if action.option_strings and action.default not in (None, False, [], "none"):
                assert str(action.default) in action.help, (name, label, action.default)
        text = sp.format_help()
        assert "``" not in text and ":func:" not in text, name  # no reStructuredText


def test_top_level_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0 and "``" not in out.stdout
    parser = cli.make_parser()
    listed = {a.dest: a.help for act in parser._actions
              if isinstance(act, argparse._SubParsersAction) for a in act._choices_actions}
    assert set(listed) == set(_subparsers(parser))  # every command has a help line
    for name, help_line in listed.items():
        assert help_line and name in out.stdout, name
        assert help_line.split(",")[0] in " ".join(out.stdout.split()), name
        sub = run(name, "--help")
        assert sub.returncode == 0 and "(default: " in sub.stdout and "``" not in sub.stdout


def test_help_is_fast_and_light() -> None:
    # the parser imports no torch-heavy code: --help and option errors answer at once
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "fxfuse", "fuse", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "networkx" not in out.stderr and "scipy" not in out.stderr


def test_verify_names_a_non_finite_parameter() -> None:
    model = models.get("mlp").factory()
    x = models.get("mlp").example_inputs()
    spec = fxfuse.find_groups(model, x)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    name = next(k for k, _ in model.named_parameters())
    with pytest.raises(fxfuse.InputError, match=f"{name}.*NaN or infinite"):
        fxfuse.verify(model, spec, x)
