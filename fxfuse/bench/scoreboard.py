"""One scoreboard table per setting: every client, the best client and every registered method,
scored on the same test split, for clients of each initialisation.

A :class:`Setting` names the dataset, the split (scheme, clients, parameters, seed), the client
models and training :class:`~fxfuse.bench.clients.Budget`, and the fusion-set size.
:func:`run_setting` draws the split and the fusion set, trains (or loads from the cache) the
clients once per initialisation (``"different"``: client ``k`` from seed ``seed + k``;
``"common"``: all from ``seed``), runs every method of :data:`~fxfuse.bench.methods.METHODS` on
them and scores each model on the test split: accuracy, mean cross-entropy (nats) and the
seconds it took to produce (training for a client, the method's wall time for the rest).  A
method that does not apply shows ``n/a: <reason>``; one that raises shows ``failed: <error>``
(the table is still written, the failure is visible; the tests require no such cell).  ``best client`` is
the client with the highest *test* accuracy: an oracle choice, as an upper reference for picking
one client.  :func:`render_table` / :func:`render_summary` write Markdown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from . import datasets
from .clients import INITS, Budget, ModelSpec, TrainedClient, train_clients
from .methods import METHODS, Context, Method, NotApplicable
from .splits import Split, fusion_set, split

__all__ = ["Cell", "Row", "Setting", "Table", "default_model", "evaluate", "render_counts",
           "render_summary", "render_table", "run_setting"]

MLP_FACTORY = "models.zoo:mlp_classifier"


def default_model(dataset: str) -> ModelSpec:
    """The client MLP of a dataset: MNIST 784-256-10 (the neuron-interpolation MNIST MLP),
    digits 64-64-10 (``models.zoo.mlp_classifier``, ReLU, no norm)."""
    if dataset == "mnist":
        return ModelSpec(MLP_FACTORY, {"in_dim": 784, "widths": [256]})
    if dataset == "digits":
        return ModelSpec(MLP_FACTORY, {"in_dim": 64, "widths": [64]})
    raise InputError(f"no default model for dataset {dataset!r}; give Setting(models=...)")


@dataclass(frozen=True)
class Setting:
    """One scoreboard table: ``n_clients`` clients of ``dataset`` split by ``scheme``.

    ``models``: one :class:`ModelSpec` for every client or one per client (default
    :func:`default_model`); ``alpha``: the ``"dirichlet"`` parameter; ``fusion_size``: samples
    of the balanced fusion set; ``inits``: which client initialisations to train and score.
    """

    dataset: str
    n_clients: int
    scheme: str = "dirichlet-per-class"
    alpha: float = 0.5
    models: ModelSpec | tuple[ModelSpec, ...] | None = None
    budget: Budget = Budget()  # noqa: RUF009 - frozen config
    seed: int = 0
    fusion_size: int = 400
    inits: tuple[str, ...] = INITS
    label: str = ""

    def __post_init__(self) -> None:
        for init in self.inits:
            if init not in INITS:
                raise InputError(f"Setting.inits: unknown init {init!r}; expected {list(INITS)}")
        if not self.inits:
            raise InputError("Setting.inits must name at least one initialisation")

    def specs(self) -> list[ModelSpec]:
        m = self.models if self.models is not None else default_model(self.dataset)
        return [m] * self.n_clients if isinstance(m, ModelSpec) else list(m)

    def scheme_text(self) -> str:
        if self.scheme == "dirichlet-per-class":
            return "per-class Dirichlet, client concentrations 1..5 (neuron interpolation)"
        if self.scheme == "dirichlet":
            return f"Dirichlet(alpha={self.alpha:g}) over clients per class (PFNM / GAMF)"
        if self.scheme == "shards":
            return "shards: disjoint class sets"
        return "iid"

    def title(self) -> str:
        extra = f", {self.label}" if self.label else ""
        return f"{self.dataset}, {self.n_clients} clients, {self.scheme_text()}{extra}"


@dataclass
class Cell:
    """One score: test ``acc`` in [0, 1], ``loss`` (nats), ``seconds``; ``note`` is ``n/a: ...``
    or ``failed: ...`` when there is no score, else an optional remark."""

    acc: float | None = None
    loss: float | None = None
    seconds: float | None = None
    note: str = ""


@dataclass
class Row:
    name: str
    kind: str  # "client", "best" or "method"
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class Table:
    setting: Setting
    split: Split
    fusion_indices: list[int]
    rows: list[Row]
    clients: dict[str, list[TrainedClient]]
    seconds: float

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
             ) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``(x, y)`` (eval mode, no grad)."""
    model.eval()
    correct, loss = 0, 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct / x.shape[0], loss / x.shape[0]


def _states(models: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


def _unchanged(models: Sequence[nn.Module], before: Sequence[dict[str, torch.Tensor]]) -> bool:
    return all(all(torch.equal(v, b[k]) for k, v in m.state_dict().items())
               for m, b in zip(models, before))


def _run_method(fn: Method, ctx: Context, data: datasets.Dataset) -> Cell:
    before = _states(ctx.models)
    start = time.perf_counter()
    try:
        out = fn(ctx)
    except NotApplicable as exc:
        return Cell(note=f"n/a: {exc}")
    except Exception as exc:  # any failure is a visible cell, not a lost run of many settings
        first = str(exc).splitlines()[0] if str(exc) else ""
        return Cell(note=f"failed: {type(exc).__name__}: {first}")
    seconds = time.perf_counter() - start
    if not _unchanged(ctx.models, before):
        for m, b in zip(ctx.models, before):
            m.load_state_dict(b)
        return Cell(note="failed: the method modified the client models (restored)")
    model, note = out if isinstance(out, tuple) else (out, "")
    if not isinstance(model, nn.Module):
        return Cell(note=f"failed: returned a {type(model).__name__}, not an nn.Module")
    acc, loss = evaluate(model, data.test_x, data.test_y)
    return Cell(acc, loss, seconds, note)


def run_setting(
    setting: Setting,
    data: datasets.Dataset | None = None,
    methods: Mapping[str, Method] | None = None,
    *,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Table:
    """Train / load the clients of ``setting`` and score them and every method (default
    :data:`METHODS`, in order) on ``data``'s test split."""
    start = time.perf_counter()
    data = data if data is not None else datasets.load(setting.dataset)
    chosen = METHODS if methods is None else methods
    s = split(data.train_y, setting.n_clients, setting.scheme, alpha=setting.alpha,
              seed=setting.seed)
    fidx = fusion_set(s, data.train_y, setting.fusion_size, seed=setting.seed)
    fi = torch.from_numpy(fidx)
    fusion_x, fusion_y = data.train_x[fi], data.train_y[fi]
    specs = setting.specs()
    client_rows = [Row(f"client {k} ({s.sizes[k]} samples)", "client")
                   for k in range(setting.n_clients)]
    best = Row("best client (oracle: by test acc)", "best")
    method_rows = [Row(name, "method") for name in chosen]
    trained: dict[str, list[TrainedClient]] = {}
    for init in setting.inits:
        clients = train_clients(data.train_x, data.train_y, s, specs, setting.budget,
                                seed=setting.seed, init=init, cache=cache, cache_dir=cache_dir,
                                progress=progress)
        trained[init] = clients
        scores = []
        for c, row in zip(clients, client_rows):
            acc, loss = evaluate(c.model, data.test_x, data.test_y)
            scores.append(acc)
            row.cells[init] = Cell(acc, loss, c.train_seconds, "cached" if c.cached else "")
        k_best = max(range(len(scores)), key=scores.__getitem__)
        bc = client_rows[k_best].cells[init]
        best.cells[init] = Cell(bc.acc, bc.loss, bc.seconds, f"client {k_best}")
        ctx = Context(clients=list(clients), split=s, init=init,
                      example=fusion_x[:2], fusion_x=fusion_x, fusion_y=fusion_y,
                      extras={"fusion_index": fidx})
        for (name, fn), row in zip(chosen.items(), method_rows):
            row.cells[init] = _run_method(fn, ctx, data)
            if progress:
                cell = row.cells[init]
                score = cell.note if cell.acc is None else f"{100 * cell.acc:.2f}%"
                print(f"  [{setting.title()} / {init} init] {name}: {score}", file=sys.stderr,
                      flush=True)
    return Table(setting, s, fidx.tolist(), [*client_rows, best, *method_rows], trained,
                 time.perf_counter() - start)


# -- Markdown ------------------------------------------------------------------------------------
def _cells(cell: Cell | None) -> list[str]:
    if cell is None:
        return ["not run", "-", "-"]
    if cell.acc is None or cell.loss is None:
        return [cell.note or "n/a", "-", "-"]
    acc = f"{100 * cell.acc:.2f}"
    if cell.note and not cell.note.startswith(("cached",)):
        acc += f" ({cell.note})"
    secs = "-" if cell.seconds is None else f"{cell.seconds:.2f}"
    return [acc, f"{cell.loss:.4f}", secs]


def render_table(table: Table) -> list[str]:
    """The setting's header lines and its Markdown table."""
    st, s = table.setting, table.split
    specs = st.specs()
    models = specs[0].describe() if all(m == specs[0] for m in specs) else \
        ", ".join(m.describe() for m in specs)
    inits = list(st.inits)
    top = [f"{100 * float(r.max()) / max(int(r.sum()), 1):.0f}%" for r in s.counts]
    lines = [
        f"### {st.title()}",
        "",
        f"- Split: `split(train_y, {st.n_clients}, scheme={st.scheme!r}"
        + (f", alpha={st.alpha:g}" if st.scheme == "dirichlet" else "")
        + f", seed={st.seed})`: {'/'.join(str(n) for n in s.sizes)} samples per client; "
        f"largest class share per client {'/'.join(top)}; split fingerprint "
        f"`{s.fingerprint[:12]}`.",
        f"- Clients: {models}; {st.budget.describe()}. Fusion set: {len(table.fusion_indices)} "
        f"class-balanced samples from the clients' own training data (seed {st.seed}).",
        "",
        "| model | " + " | ".join(f"{i} init: test acc % | loss | time s" for i in inits) + " |",
        "|---|" + "---:|---:|---:|" * len(inits),
    ]
    for row in table.rows:
        cells = [c for i in inits for c in _cells(row.cells.get(i))]
        name = f"**{row.name}**" if row.kind == "best" else row.name
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, "", *render_counts(s), ""]


def render_counts(s: Split) -> list[str]:
    """The split's class counts per client (a collapsed Markdown block), with the Dirichlet
    concentration each client drew for each class where the scheme has one."""
    head = "| client | " + " | ".join(str(c) for c in s.classes) + " | total |"
    lines = ["<details><summary>class counts per client"
             + (" (concentration drawn per class in brackets)"
                if s.scheme == "dirichlet-per-class" else "") + "</summary>", "", head,
             "|---|" + "---:|" * (len(s.classes) + 1)]
    for k, row in enumerate(s.counts):
        cells = []
        for j, n in enumerate(row):
            conc = (f" [{s.concentrations[j, k]:.2g}]"
                    if s.scheme == "dirichlet-per-class" and s.concentrations is not None else "")
            cells.append(f"{int(n)}{conc}")
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {int(row.sum())} |")
    return [*lines, "", "</details>"]


SUMMARY_ROWS = ("best client (oracle: by test acc)", "vanilla average", "weight matching",
                "activation matching", "activation matching + REPAIR", "logit ensemble")


def render_summary(tables: Sequence[Table], init: str = "different",
                   rows: Sequence[str] = SUMMARY_ROWS) -> list[str]:
    """One line per setting: test accuracy % of the chosen rows for clients of ``init``, the
    common-init vanilla average (one FedAvg round) when it was run, and the method row with the
    highest accuracy (any method: fused networks, ensembles and routers alike)."""
    head = [r.replace(" (oracle: by test acc)", "") for r in rows]
    lines = ["| setting | " + " | ".join(head) + " | vanilla average, common init | top method "
             "row |", "|---|" + "---:|" * (len(rows) + 1) + "---|"]

    def short(t: Table, name: str, which: str) -> str:
        try:
            cell = t.row(name).cells.get(which)
        except KeyError:
            return "-"
        if cell is None:
            return "-"
        return cell.note.split(":")[0] if cell.acc is None else f"{100 * cell.acc:.2f}"

    def top(t: Table) -> str:
        scored = [(c.acc, r.name) for r in t.rows if r.kind == "method"
                  for c in [r.cells.get(init)] if c is not None and c.acc is not None]
        if not scored:
            return "-"
        acc, name = max(scored, key=lambda p: p[0])
        return f"{name} {100 * acc:.2f}"

    for t in tables:
        cells = [short(t, r, init) for r in rows] + [short(t, "vanilla average", "common"),
                                                     top(t)]
        lines.append(f"| {t.setting.title()} | " + " | ".join(cells) + " |")
    return [*lines, ""]
