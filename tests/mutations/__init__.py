"""Mutation check: plant a known bug in a copy of the repository and see whether the tests meant
to catch it fail.

Each :class:`Mutation` names one file, an exact snippet of it, the snippet that replaces it (the
bug), and the pytest arguments (node ids, ``-k`` filters) of the tests that must catch it.  For
each mutation the repository's files (``git ls-files``: tracked and untracked, not ignored) are
copied into a fresh temporary folder, the snippet is replaced there, and the tests run in a
pytest subprocess inside the copy (``-x``, JUnit XML for the per-test outcome).  Verdicts:

* ``caught``: pytest ran the tests and at least one failed or errored;
* ``missed``: every test passed with the bug in place;
* ``broken``: pytest did not run the tests (collection error, unknown node id, no test
  collected): the mutation or its test list needs fixing;
* ``timeout``: the tests ran past the time limit;
* ``stale``: the old snippet is not in the current file exactly once; checked for every selected
  mutation before anything runs, and an error, never a pass: update the snippet to the code.

Before the mutations, a *baseline* runs each distinct test list on the unmutated copy; if one
fails, no verdict means anything and the run stops.

Run ``python -m tests.mutations`` (all mutations), ``--short`` (the CI list), ``--list``, or name
mutations.  Adding one is one entry in :data:`MUTATIONS`::

    Mutation("name", "fxfuse/file.py",
             "exact old snippet", "buggy new snippet",
             ("tests/test_x.py::test_that_catches_it",)),
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    """A planted bug: ``old`` (exact, found once in ``file``) becomes ``new``; ``tests`` are the
    pytest arguments of the tests that must fail."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


class StaleMutationError(Exception):
    """A mutation's old snippet is not found exactly once in its file."""


@dataclass
class Outcome:
    """One pytest run: the verdict, its time, the failing tests (with the first line of each
    failure message) and the output's tail."""

    name: str
    verdict: str
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)
    n_tests: int = 0
    tail: str = ""


# --- the list -------------------------------------------------------------------------------
RULES = "tests/test_rules.py::test_rule_is_equivariant"
REPAIR_TESTS = ("tests/test_fuse.py::test_repair_restores_every_layers_statistics",
                "tests/test_fuse.py::test_repair_on_a_layernorm_net_restores_every_layer")

MUTATIONS: list[Mutation] = [
    Mutation("bn-rule-without-running-var", "fxfuse/rules/layers.py",
             'names = ("weight", "bias", "running_mean", "running_var")',
             'names = ("weight", "bias", "running_mean")',
             (RULES, "-k", "batchnorm")),
    Mutation("apply-perms-skips-running-var", "fxfuse/permute.py",
             "if not a.groups or not any(g in perms for g in a.groups):",
             "if key.endswith('running_var') or not a.groups or not any(g in perms for g in a.groups):",
             ("tests/test_zoo.py::test_verify_passes",
              "tests/test_fuse.py::test_self_recovery_with_weight_matching", "-k", "vgg_bn")),
    Mutation("repair-target-from-endpoint-0-only", "fxfuse/repair.py",
             "w = state.weights[k]",
             "w = 1.0 if k == 0 else 0.0",
             REPAIR_TESTS),
    Mutation("repair-rms-instead-of-std", "fxfuse/repair.py",
             "return mean, (self.ss / self.n - mean**2).clamp_min(0).add(eps).sqrt()",
             "return mean, (self.ss / self.n).add(eps).sqrt()",
             REPAIR_TESTS),
    Mutation("repair-statistics-measured-once", "fxfuse/repair.py",
             "for kind, name in progress(points, \"repair layers\", state.progress):\n"
             "            if kind == \"bn\":\n"
             "                reset_batchnorm(fused, data, state.device, only=[fused.get_submodule(name)])\n"
             "            elif name in targets:\n"
             "                mean_f, std_f = _measure(fused, [name], data, state.device, cfg.eps, \"\", False)[name]",
             # every layer's fused statistics measured up front, before any earlier layer is folded
             "once = _measure(fused, list(targets), data, state.device, cfg.eps, \"\", False)\n"
             "        for kind, name in progress(points, \"repair layers\", state.progress):\n"
             "            if kind == \"bn\":\n"
             "                reset_batchnorm(fused, data, state.device, only=[fused.get_submodule(name)])\n"
             "            elif name in targets:\n"
             "                mean_f, std_f = once[name]",
             REPAIR_TESTS),
    Mutation("repair-endpoints-before-alignment", "fxfuse/repair.py",
             "m, s = (_to_fused(v, state, k, f\"{name}.weight\", maps[k]) for v in (m, s))",
             "m, s = m, s  # the endpoint's statistics left in its own basis",
             REPAIR_TESTS),
    Mutation("reset-bn-only-the-first", "fxfuse/repair.py",
             "else [m for m in model.modules() if isinstance(m, BATCHNORMS)]",
             "else [m for m in model.modules() if isinstance(m, BATCHNORMS)][:1]",
             ("tests/test_fuse.py::test_reset_batchnorm_matches_fresh_statistics",)),
    Mutation("onnx-check-compares-reference-with-itself", "fxfuse/export_onnx.py",
             "diff = rel_diff([ref], [got_t])",
             "diff = rel_diff([ref], [ref])",
             ("tests/test_onnx_parity.py::test_export_check_rejects_a_file_that_differs",)),
    Mutation("groupnorm-rule-ignores-groups", "fxfuse/rules/layers.py",
             "rels = same(channels, x[1], y[1], *(p[0] for p in params if p is not None))",
             "rels = same(x[1], y[1], *(p[0] for p in params if p is not None))",
             (RULES, "-k", "groupnorm or group_norm")),
    # map core (fxfuse/maps.py, fxfuse/groups/roles.py)
    Mutation("map-input-side-with-M", "fxfuse/maps.py",
             "mat = unmerge.T if role == IN else merge",
             "mat = merge",
             ("tests/test_maps.py::test_a_narrow_model_copied_into_a_wider_one_computes_the_same_function",)),
    Mutation("second-moment-averaged-like-a-mean", "fxfuse/maps.py",
             "if role.startswith(SECOND):",
             "if False:",
             ("tests/test_maps.py::test_second_moments_merge_as_a_mixture",)),
    Mutation("role-output-side-read-as-input", "fxfuse/groups/discover.py",
             "            role = OUT\n",
             "            role = IN\n",
             ("tests/test_maps.py::test_a_narrow_model_copied_into_a_wider_one_computes_the_same_function",)),
    # still to come with cross-model pairing (different widths): a group paired with the wrong
    # partner.
]

#: Run in CI by tests/test_mutations.py: one per kind of test that was blind before, fast ones.
SHORT: tuple[str, ...] = ("bn-rule-without-running-var", "reset-bn-only-the-first",
                          "repair-target-from-endpoint-0-only",
                          "onnx-check-compares-reference-with-itself")


def by_name(names: Iterable[str]) -> list[Mutation]:
    """The mutations called ``names``, in that order; an unknown name raises ``KeyError``."""
    index = {m.name: m for m in MUTATIONS}
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f"unknown mutations {missing}; known: {sorted(index)}")
    return [index[n] for n in names]


# --- mechanics ------------------------------------------------------------------------------
def check_fresh(mutations: Sequence[Mutation], root: Path = ROOT) -> None:
    """Raise :class:`StaleMutationError` naming every mutation whose old snippet is not found
    exactly once in its file under ``root`` (or that would change nothing)."""
    problems = []
    for m in mutations:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text().count(m.old)
        if count != 1 or m.old == m.new:
            what = "not found" if count == 0 else f"found {count} times" if count else ""
            problems.append(f"{m.name}: old snippet {what or 'equals the new one'} in {m.file}: "
                            f"{m.old!r}")
    if problems:
        raise StaleMutationError("stale mutations (update them to the current code):\n  "
                                 + "\n  ".join(problems))


def repo_files(root: Path = ROOT) -> list[str]:
    """The repository's files as git sees them: tracked plus untracked, ignored ones left out."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True)
    return sorted({p for p in out.stdout.decode().split("\0") if p and (root / p).is_file()})


_IGNORED = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".*_cache", "build", "dist",
                                  ".venv", ".benchmarks")


def copy_repo(dst: Path, root: Path = ROOT) -> None:
    """Copy the repository's files (git's view; without git, the tree less caches) to ``dst``."""
    try:
        files = repo_files(root)
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(root, dst, ignore=_IGNORED)
        return
    for rel in files:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def apply(m: Mutation, root: Path) -> None:
    """Plant ``m`` in the copy at ``root`` (checked fresh there too)."""
    check_fresh([m], root)
    path = root / m.file
    path.write_text(path.read_text().replace(m.old, m.new, 1))


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _check_imports_from(root: Path) -> None:
    """The copy, not the installed checkout, must be what the subprocess imports."""
    out = subprocess.run([sys.executable, "-c", "import fxfuse; print(fxfuse.__file__)"],
                         cwd=root, env=_env(root), capture_output=True, text=True, timeout=120)
    where = Path(out.stdout.strip() or "?").resolve()
    if root.resolve() not in where.parents:
        raise RuntimeError(f"the copy at {root} imports fxfuse from {where}; mutations would not "
                           f"be seen ({out.stderr.strip()})")


def run_tests(root: Path, args: Sequence[str], name: str, timeout: float,
              stop_first: bool = True) -> Outcome:
    """Run pytest ``args`` in ``root``; the verdict is ``caught`` when a test failed."""
    xml = root / ".mutation-junit.xml"
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-n", "0", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *(["-x"] if stop_first else [])]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome(name, "timeout", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    tail = (proc.stdout + proc.stderr)[-3000:]
    failed: list[str] = []
    n = 0
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            n += 1
            bad = case.find("failure")
            bad = case.find("error") if bad is None else bad
            if bad is not None:
                first = (bad.get("message") or "").strip().splitlines()[:1]
                failed.append(f"{case.get('classname')}::{case.get('name')}"
                              + (f" ({first[0][:120]})" if first else ""))
    if proc.returncode == 0 and n > 0 and not failed:
        verdict = "missed"
    elif proc.returncode == 1 and failed:
        verdict = "caught"
    else:
        verdict = "broken"
    return Outcome(name, verdict, seconds, failed, n, tail)


def run(mutations: Sequence[Mutation], *, baseline: bool = True, timeout: float = 600.0,
        echo: bool = False, every_test: bool = False, workers: int = 1) -> list[Outcome]:
    """Check every mutation is fresh, run the baseline (optional), then each mutation in its
    own copy (stopping at the first failing test unless ``every_test``), ``workers`` at a time.
    Returns one :class:`Outcome` per mutation, in order (the baselines first, if run)."""
    check_fresh(mutations)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="fxfuse-mutation-") as tmp:
        clean = Path(tmp) / "baseline"
        copy_repo(clean)
        _check_imports_from(clean)
        if baseline:
            for args in dict.fromkeys(m.tests for m in mutations):
                base = run_tests(clean, args, f"(baseline) {' '.join(args)}", timeout,
                                 stop_first=False)
                base.verdict = "passes" if base.verdict == "missed" else "FAILS"
                outcomes.append(base)
                if echo:
                    print(format_outcome(base), flush=True)
                if base.verdict != "passes":
                    return outcomes
        def one(m: Mutation) -> Outcome:
            copy = Path(tmp) / m.name
            shutil.copytree(clean, copy)
            apply(m, copy)
            outcome = run_tests(copy, m.tests, m.name, timeout, stop_first=not every_test)
            shutil.rmtree(copy, ignore_errors=True)
            if echo:
                print(format_outcome(outcome), flush=True)
            return outcome

        # each mutation is its own copy and pytest process: ``workers`` of them side by side
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            outcomes += list(pool.map(one, mutations))
    return outcomes


def format_outcome(o: Outcome) -> str:
    detail = f"{len(o.failed)} of {o.n_tests} failed: {'; '.join(o.failed)}" if o.failed \
        else f"{o.n_tests} tests"
    return f"{o.verdict:8s} {o.seconds:6.1f} s  {o.name:45s} {detail}"
