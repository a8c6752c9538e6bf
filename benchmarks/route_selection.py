"""Benchmark: adaptive model selection (``fxfuse.adaptive_selection``) against every client, the
vanilla average, the best fusion method and the logit ensemble, on non-IID MNIST clients.

Settings: MNIST split by ``"dirichlet"`` (alpha 0.5, PFNM / GAMF) and ``"shards"`` (disjoint
class sets), 2 / 4 / 8 clients, once with one architecture (the scoreboard's MLP 784-256-10) and
once mixed (clients alternate MLP and ``benchmarks.route_models:mnist_cnn``).  Every setting is a
``fxfuse.bench.scoreboard.Setting`` run by ``run_setting`` with all registered methods
(``fxfuse/bench/methods.py``: the ``AMS: ...`` rows are the selectors), different-init clients
only, clients cached in ``benchmarks/.cache`` (shared with ``benchmarks/scoreboard.py``).  The
selectors are fitted on the scoreboard's fusion set (400 class-balanced samples of the clients'
own training data, each tagged with the client holding it), the data every data-aware fusion row
gets.  Compute per input is multiply-accumulates of the Linear / Conv layers
(``RouteReport.macs_pytorch`` / ``macs_onnx``).

Run from the repository root::

    python benchmarks/route_selection.py --write
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks._report import (  # noqa: E402
    RESULTS_PATH,
    cpu_name,
    fxfuse_revision,
    load_average,
    revision_note,
    write_section,
)
from fxfuse.bench import ModelSpec, datasets  # noqa: E402
from fxfuse.bench.methods import METHODS  # noqa: E402
from fxfuse.bench.scoreboard import MLP_FACTORY, Setting, Table, run_setting  # noqa: E402

BEGIN = "<!-- route-selection:begin -->"
END = "<!-- route-selection:end -->"
COMMAND = "python benchmarks/route_selection.py --write"
CACHE_DIR = REPO_ROOT / "benchmarks" / ".cache"
MLP = ModelSpec(MLP_FACTORY, {"in_dim": 784, "widths": [256]})
CNN = ModelSpec("benchmarks.route_models:mnist_cnn", {})
FUSION = ("weight matching", "weight matching + REPAIR", "activation matching",
          "activation matching + REPAIR")


def settings(budget: object) -> list[Setting]:
    out = []
    for mixed in (False, True):
        for scheme in ("dirichlet", "shards"):
            for k in (2, 4, 8):
                models = tuple(MLP if i % 2 == 0 else CNN for i in range(k)) if mixed else MLP
                out.append(Setting("mnist", k, scheme, alpha=0.5, models=models,
                                   budget=budget, inits=("different",),  # type: ignore[arg-type]
                                   label="MLP + CNN" if mixed else ""))
    return out


def _acc(table: Table, name: str) -> float | None:
    try:
        return table.row(name).cells["different"].acc
    except KeyError:
        return None


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def summary(tables: list[Table]) -> list[str]:
    ams = [n for n in METHODS if n.startswith("AMS: ")]
    head = ["setting", "best client", "vanilla avg", "best fusion", "logit ens.",
            *[n[5:] for n in ams], "goal met by"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for t in tables:
        st = t.setting
        best = _acc(t, "best client (oracle: by test acc)")
        ens = _acc(t, "logit ensemble")
        fusion = [a for a in (_acc(t, n) for n in FUSION) if a is not None]
        scores = {n: _acc(t, n) for n in ams}
        met = [n[5:] for n, a in scores.items() if a is not None and ens is not None
               and best is not None and a > ens and a >= best]
        name = f"{st.scheme} {st.n_clients}" + (" MLP+CNN" if st.label else " MLP")
        lines.append("| " + " | ".join([name, _pct(best), _pct(_acc(t, "vanilla average")),
                                         _pct(max(fusion) if fusion else None), _pct(ens),
                                         *[_pct(a) for a in scores.values()],
                                         "; ".join(met) or "**none (miss)**"]) + " |")
    return lines


def compute(tables: list[Table]) -> list[str]:
    ams = [n for n in METHODS if n.startswith("AMS: ")]
    head = ["setting", *[n[5:] for n in ams]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(ams)]
    for t in tables:
        st = t.setting
        name = f"{st.scheme} {st.n_clients}" + (" MLP+CNN" if st.label else " MLP")
        cells = []
        for n in ams:
            note = t.row(n).cells["different"].note
            cells.append(note.replace("kMAC/input ", "").replace(" PyTorch, ", " / ")
                         .replace(" ONNX", "") if note.startswith("kMAC") else note or "-")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from benchmarks.scoreboard import MNIST_BUDGET

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS_PATH.name}")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    start, load_start, revision = time.perf_counter(), load_average(), fxfuse_revision()
    data = datasets.load("mnist")
    tables = []
    for s in settings(MNIST_BUDGET):
        if not args.quiet:
            print(f"== {s.title()}", file=sys.stderr, flush=True)
        tables.append(run_setting(s, data, METHODS, cache=True, cache_dir=CACHE_DIR,
                                  progress=not args.quiet))
    section = "\n".join([
        BEGIN,
        "## Adaptive model selection on non-IID MNIST clients",
        "",
        f"Command: `{COMMAND}`",
        "",
        f"- Date: {datetime.date.today().isoformat()}; machine: {os.cpu_count()}-core CPU "
        f"({cpu_name()}), one thread, torch {torch.__version__}, Python "
        f"{platform.python_version()}, fxfuse at commit {revision_note(revision)}; run time "
        f"{time.perf_counter() - start:.0f} s, load average {load_start} / {load_average()}.",
        "- Clients and splits as in the scoreboard (`fxfuse.bench`, different init, "
        f"{MNIST_BUDGET.describe()}); MLP = 784-256-10, CNN = "
        "`benchmarks.route_models.MnistCNN` (clients alternate MLP, CNN, ...). Selectors are "
        "fitted on the 400-sample fusion set (each sample tagged with its client). Test "
        "accuracy % on the 10k MNIST test split. *best fusion*: the best of weight / activation "
        "matching with or without REPAIR (n/a across architectures). Goal (issue 13): a "
        "selector above the logit ensemble and not below the best client (an oracle pick by "
        "test accuracy).",
        "",
        *summary(tables),
        "",
        "Compute per input, thousand multiply-accumulates, PyTorch / ONNX. In PyTorch the gate "
        "alone and input-space density run only the chosen client per sample (plus the "
        "selector); confidence, entropy, gate x confidence and feature-space density run every "
        "client. In ONNX every client runs on every sample. The logit ensemble costs the sum "
        "of the clients.",
        "",
        *compute(tables),
        END,
    ]) + "\n"
    print(section)
    if args.write:
        write_section(section, BEGIN, END, path=RESULTS_PATH)
        print(f"wrote the route-selection section of {RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
