"""Every bad ``fxfuse`` input, enumerated from the parser: each fails with exit status 2 and one
line on stderr (no traceback) that names the option, writes nothing and leaves the inputs as they
were (checked by hash).

The cases are not listed by hand: the test walks every subcommand's argparse actions and asks
each option's *value kind* (``fxfuse.cli.Integer``, ``Shape``, ``InputFile``, ...) for its bad
values (missing, malformed, out of range, wrong kind of file, missing folder), adds a missing
value per option, and takes the contradictory combinations from each command's ``conflicts``.
An option whose kind has no bad values here fails the test, so a new option is covered when it
is added.  Each command line runs in its own process (``tests/cli_runner.py`` forks one per
case after importing torch once).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fxfuse import cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tests.cli_models:tiny_mlp"

#: A valid command line per subcommand (the bad cases change one thing in it).  ``demo`` trains
#: on MNIST, so its base line is not run; its bad values all fail while parsing.
BASE: dict[str, list[str]] = {
    "groups": ["groups", MODEL, "--input-shape", "2,4", "--weights", "a.pt"],
    "fuse": ["fuse", MODEL, "a.pt", "b.pt", "--input-shape", "2,4", "--out", "fused.pt",
             "--quiet"],
    "select": ["select", "a.pt", "b.pt", "--model", MODEL, "--input-shape", "2,4", "--out",
               "router.onnx"],
    "scopes": ["scopes", MODEL, "a.pt", "b.pt", "--input-shape", "2,4"],
    "demo": ["demo", "--epochs", "1", "--width", "8", "--quiet"],
}
RUN_BASE = ("groups", "fuse", "select", "scopes")
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # permissions do not stop root


@dataclass
class Case:
    """One bad command line: ``argv`` run in a fresh copy of the fixture folder; the one stderr
    line must contain every string in ``mentions``."""

    id: str
    argv: list[str]
    mentions: tuple[str, ...]
    prepare: str | None = None  # "unreadable FILE": make FILE unreadable in the case folder
    cwd: Path = field(default=Path("."))


# --- fixture files --------------------------------------------------------------------------------


def make_fixtures(folder: Path) -> None:
    from tests.cli_models import tiny_mlp

    a = tiny_mlp()
    torch.save(a.state_dict(), folder / "a.pt")
    b = tiny_mlp()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(b.state_dict(), folder / "b.pt")
    nan = {k: v.clone() for k, v in a.state_dict().items()}
    nan["2.weight"][0, 0] = float("nan")
    torch.save(nan, folder / "nan.pt")
    torch.save(tiny_mlp(width=5).state_dict(), folder / "other.pt")  # another architecture
    torch.save([1, 2, 3], folder / "list.pt")  # not a state_dict
    (folder / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    (folder / "corrupt.npz").write_bytes(b"not an archive")
    (folder / "notes.txt").write_text("a text file\n")
    (folder / "adir.pt").mkdir()  # a folder named like a file
    (folder / "outdir.pt").mkdir()
    (folder / "outdir.json").mkdir()
    (folder / "outdir.graphml").mkdir()
    (folder / "outdir.onnx").mkdir()
    torch.save({"x": torch.randn(16, 4), "y": torch.randint(0, 3, (16,))}, folder / "data.pt")
    torch.save({"x": torch.randn(16, 5)}, folder / "wrongshape.pt")  # samples (5,) not (4,)
    torch.save({"inputs": torch.randn(16, 4), "labels": torch.zeros(16)}, folder / "badkeys.pt")
    torch.save({"x": torch.randn(16, 4), "y": torch.zeros(3)}, folder / "badlen.pt")


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` (hidden ones too) -> hash of its content ("dir" for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_dir():
            out[rel] = "dir"
        elif os.access(p, os.R_OK):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = f"unreadable {p.stat().st_mtime_ns}"
    return out


# --- bad values per value kind ----------------------------------------------------------------------


def _with(argv: list[str], action: argparse.Action, value: str | None,
          extra: tuple[str, ...] = ()) -> list[str]:
    """``argv`` with ``action``'s value replaced by ``value`` (``None``: no value at all)."""
    argv = list(argv)
    if not action.option_strings:  # positional: its values sit at POSITIONS[dest]
        start, count = POSITIONS[argv[0]][str(action.dest)]
        argv[start:start + count] = [] if value is None else [value] + argv[start + 1:start + count]
        return argv + list(extra)
    opt = action.option_strings[0]
    if opt in argv:
        i = argv.index(opt)
        del argv[i:i + 2]
    if value is None:
        return argv + list(extra) + [opt]  # last: nothing can follow as its value
    return argv + list(extra) + [opt, value]


#: Where each positional's values are in BASE: command -> dest -> (index, count).
POSITIONS = {"groups": {"model": (1, 1)}, "fuse": {"model": (1, 1), "checkpoints": (2, 2)},
             "select": {"checkpoints": (1, 2)}, "scopes": {"model": (1, 1), "checkpoints": (2, 2)},
             "demo": {}}


def bad_values(kind: object, command: str, action: argparse.Action
               ) -> Iterator[tuple[str, str, tuple[str, ...], str | None]]:
    """(id, bad value, extra arguments, preparation) for one option of one value kind."""
    if isinstance(kind, cli.Integer):
        yield "not-a-number", "abc", (), None
        yield "fraction", "1.5", (), None
        yield "below-range", str(kind.lo - 1), (), None
        if kind.hi is not None:
            yield "above-range", str(kind.hi + 1), (), None
    elif isinstance(kind, cli.Number):
        yield "not-a-number", "abc", (), None
        yield "nan", "nan", (), None
        yield "infinite", "inf", (), None
        yield "below-range", str(kind.lo - 1), (), None
        yield "at-upper-bound", str(kind.hi), (), None
    elif isinstance(kind, cli.Shape):
        yield "malformed", "2,x", (), None
        yield "empty", "", (), None
        yield "zero-size", "0,4", (), None
        yield "negative", "2,-1", (), None
        yield "unknown-dtype", "2,4:complex", (), None
        yield "huge", "100000,100000", (), None
        yield "wrong-shape-for-model", "2,7", (), None
    elif isinstance(kind, cli.JsonObject):
        yield "invalid-json", "{", (), None
        yield "json-list", "[1, 2]", (), None
        yield "json-string", '"width"', (), None
        yield "unknown-argument", '{"no_such_argument": 1}', (), None
        yield "bad-argument-value", '{"width": -3}', (), None
    elif isinstance(kind, cli.ModelRef):
        yield "no-colon", "tests.cli_models", (), None
        yield "not-identifiers", "tests.cli_models:tiny mlp", (), None
        yield "missing-module", "no_such_package_xyz.mod:f", (), None
        yield "missing-attribute", "tests.cli_models:nope", (), None
        yield "not-callable", "tests.cli_models:NOT_CALLABLE", (), None
        yield "returns-no-module", "tests.cli_models:not_a_module", (), None
        yield "factory-raises", "tests.cli_models:broken", (), None
    elif isinstance(kind, cli.DataSource):
        use = ("--align", "activation") if command == "fuse" else ()
        yield "missing", "missing.pt", use, None
        yield "typo-of-mnist", "mnsit", use, None
        yield "missing-folder", "nodir/data.pt", use, None
        yield "folder", "adir.pt", use, None
        yield "wrong-suffix", "notes.txt", use, None
        yield "corrupt-pt", "corrupt.pt", use, None
        yield "corrupt-npz", "corrupt.npz", use, None
        yield "not-tensors", "list.pt", use, None
        yield "wrong-keys", "badkeys.pt", use, None
        yield "x-y-lengths-differ", "badlen.pt", use, None
        yield "samples-do-not-fit-input-shape", "wrongshape.pt", use, None
        if not ROOT_USER:
            yield "unreadable", "data.pt", use, "unreadable data.pt"
    elif isinstance(kind, cli.InputFile):
        yield "missing", "missing.pt", (), None
        yield "missing-folder", "nodir/a.pt", (), None
        yield "folder", "adir.pt", (), None
        yield "wrong-suffix", "notes.txt", (), None
        yield "corrupt", "corrupt.pt", (), None
        yield "not-a-state-dict", "list.pt", (), None
        yield "another-architecture", "other.pt", (), None
        if command == "fuse":
            yield "non-finite", "nan.pt", (), None
        if not ROOT_USER:
            yield "unreadable", "a.pt", (), "unreadable a.pt"
    elif isinstance(kind, cli.OutputFile):
        suffix = kind.suffixes[0]
        yield "missing-folder", f"nodir/out{suffix}", (), None
        yield "folder", f"outdir{suffix}", (), None
        yield "wrong-suffix", "out.bin", (), None
        yield "no-suffix", "out", (), None
        if suffix == ".onnx" or ".pt" in kind.suffixes:
            if command == "fuse":
                yield "an-input", "a.pt", (), None
                yield "an-input-under-another-name", "alias.pt", (), None
                yield "an-input-by-another-path", "./adir.pt/../a.pt", (), None
        if not ROOT_USER:
            yield "read-only-folder", f"ro/out{suffix}", (), "readonly ro"
    else:
        raise AssertionError(f"option {action.option_strings or action.dest} has value kind "
                             f"{kind!r} without bad values in this test: add them")


def option_label(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else str(action.metavar)


def cases() -> list[Case]:
    parser = cli.make_parser()
    out: list[Case] = []
    for command, base in BASE.items():
        sp = cli.subparser(parser, command)
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = option_label(action)
            name = f"{command}:{label}"
            if action.nargs == 0:  # a flag: it takes no value
                out.append(Case(f"{name}:given-a-value", base + [f"{label}=yes"], (label,)))
                continue
            out.append(Case(f"{name}:no-value", _with(base, action, None), (label,)))
            if action.choices is not None:
                out.append(Case(f"{name}:unknown-choice", _with(base, action, "bogus"), (label,)))
                continue
            for why, value, extra, prepare in bad_values(action.type, command, action):
                out.append(Case(f"{name}:{why}", _with(base, action, value, extra), (label,),
                                prepare))
        for c in sp.get_default("conflicts"):
            out.append(Case(f"{command}:conflict:{'+'.join(c.options)}", base + list(c.example),
                            c.options))
        out.append(Case(f"{command}:unknown-option", base + ["--no-such-option"],
                        ("--no-such-option",)))
    # contradictions that depend on file contents rather than on options alone
    out.append(Case("groups:--weights:non-finite-with-verify",
                    BASE["groups"][:-1] + ["nan.pt", "--verify"], ("--weights", "'2.weight'")))
    out.append(Case("fuse:CHECKPOINT:a-single-one",
                    ["fuse", MODEL, "a.pt", "--input-shape", "2,4", "--out", "f.pt"],
                    ("CHECKPOINT",)))
    out.append(Case("fuse:--out:same-as-a-second-checkpoint",
                    BASE["fuse"][:-3] + ["--out", "b.pt"],
                    ("--out", "b.pt")))
    out.append(Case("no-command", [], ("COMMAND",)))
    out.append(Case("unknown-command", ["fusee"], ("COMMAND",)))
    return out


CASES = cases()


RUNNERS = 2  # cli_runner processes side by side (the cases are independent; CI has 2 cores)


def run_all(items: list[tuple[list[str], Path]]) -> list[dict[str, object]]:
    """Every command line's outcome, in order: the cases dealt round-robin to ``RUNNERS``
    runner processes that run at the same time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for r in range(RUNNERS):
                cases = Path(tmp) / f"cases-{r}.json"
                cases.write_text(json.dumps([{"argv": argv, "cwd": str(cwd)}
                                             for argv, cwd in items[r::RUNNERS]]))
                with cases.open() as stdin:
                    procs.append(subprocess.Popen(
                        [sys.executable, str(ROOT / "tests" / "cli_runner.py")], stdin=stdin,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                        cwd=ROOT))
            outputs = []
            for proc in procs:
                out, err = proc.communicate(timeout=900)
                assert proc.returncode == 0, err
                outputs.append(json.loads(out))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    results: list[dict[str, object]] = [{} for _ in items]
    for r, out in enumerate(outputs):
        results[r::RUNNERS] = out
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, dict, dict, dict]]:
    fixtures = tmp_path_factory.mktemp("fixtures")
    make_fixtures(fixtures)
    items: list[tuple[list[str], Path]] = []
    before: dict[str, dict[str, str]] = {}
    for i, case in enumerate(CASES):
        folder = tmp_path_factory.getbasetemp() / f"case{i}"
        shutil.copytree(fixtures, folder)
        os.link(folder / "a.pt", folder / "alias.pt")  # the same file under another name
        if case.prepare:
            what, target = case.prepare.split(" ", 1)
            if what == "unreadable":
                (folder / target).chmod(0)
            else:
                (folder / target).mkdir()
                (folder / target).chmod(0o555)
        case.cwd = folder
        before[case.id] = snapshot(folder)
        items.append((case.argv, folder))
    base_dirs = []
    for command in RUN_BASE:
        folder = tmp_path_factory.getbasetemp() / f"base-{command}"
        shutil.copytree(fixtures, folder)
        base_dirs.append(folder)
        items.append((BASE[command], folder))
    outcomes = run_all(items)
    out = {}
    for case, outcome in zip(CASES, outcomes):
        out[case.id] = (case, outcome, before[case.id], snapshot(case.cwd))
    for command, folder, outcome in zip(RUN_BASE, base_dirs, outcomes[len(CASES):]):
        out[f"base:{command}"] = (Case(command, BASE[command], ()), outcome, {}, snapshot(folder))
    return out


def test_the_base_command_lines_work(results: dict) -> None:
    # the bad cases change one thing in these; they must succeed as they are
    for command in RUN_BASE:
        _, outcome, _, after = results[f"base:{command}"]
        assert outcome["rc"] == 0, (command, outcome["stderr"])
    assert "fused.pt" in results["base:fuse"][3]


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_bad_input(case_id: str, results: dict) -> None:
    case, outcome, before, after = results[case_id]
    lines = [ln for ln in str(outcome["stderr"]).splitlines() if ln.strip()]
    assert outcome["rc"] == 2, (case.argv, outcome)
    assert len(lines) == 1 and "Traceback" not in outcome["stderr"], (case.argv, lines)
    assert lines[0].startswith("fxfuse") and ": error: " in lines[0], lines[0]
    for word in case.mentions:
        assert word in lines[0], (case.argv, word, lines[0])
    assert after == before, f"{case.argv}: files changed: {set(after.items()) ^ set(before.items())}"


def test_every_option_of_every_command_has_bad_cases() -> None:
    parser = cli.make_parser()
    ids = {c.id for c in CASES}
    for command in BASE:
        sp = cli.subparser(parser, command)
        for action in sp._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = option_label(action)
            assert any(i.startswith(f"{command}:{label}:") for i in ids), (command, label)
    commands = {a for act in parser._actions if isinstance(act, argparse._SubParsersAction)
                for a in act.choices}
    assert commands == set(BASE), "a new subcommand needs a valid BASE command line here"
