"""Benchmark: discovery coverage on model families as Hugging Face ``transformers`` ships them
(tiny random configs, nothing downloaded), this checkout side by side with a baseline commit.

Per model: the trace ``find_groups`` kept (``tracer="auto"``), the hidden Linear/Conv layers
whose output axis is in a group (``fxfuse.testing.uncovered_layers``: layers producing a model
output are exempt), the cuts, the probed calls, ``fxfuse.verify`` (every group permuted at
random, outputs compared) and the discovery time.  Each code runs in its own child process per
model (``--baseline REV``: the library of commit ``REV``, extracted with ``git archive``).
``--write`` replaces the section between ``<!-- transformer-coverage:begin -->`` and
``<!-- transformer-coverage:end -->`` in ``benchmarks/RESULTS.md``.

    python benchmarks/transformer_coverage.py --baseline 529656b --write
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._report import (  # noqa: E402
    command_line,
    fxfuse_revision,
    load_average,
    load_line,
    machine_line,
    run_child,
    write_section,
)

BEGIN, END = "<!-- transformer-coverage:begin -->", "<!-- transformer-coverage:end -->"


# -- a third-party-style CNN (ConvNeXt-V2-like, as libraries write one): helpers marked with
# torch.fx.wrap that have Python control flow, a module with a shape check in forward, and a
# data-dependent overflow clamp that neither tracer can follow
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def drop_path(x: torch.Tensor, p: float = 0.0, training: bool = False) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    return x * (torch.rand(x.shape[0], 1, 1, 1) > p) / (1 - p)


def layer_scale(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != gamma.shape[0]:  # channels first
        return x * gamma.view(1, -1, 1, 1)
    return x * gamma


def pad_to_window(x: torch.Tensor, w: int) -> torch.Tensor:
    h = x.shape[-1]
    if h % w:
        x = F.pad(x, (0, w - h % w, 0, w - h % w))
    return x


def clamp_overflow(x: torch.Tensor) -> torch.Tensor:
    if bool(x.abs().max() > 1e4):  # data-dependent
        return x.clamp(-1e4, 1e4)
    return x


for _fn in ("layer_scale", "pad_to_window", "clamp_overflow"):
    torch.fx.wrap(_fn)


class GRN(nn.Module):
    """ConvNeXt-V2's global response norm, written with a shape check."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.zeros(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("expected (N, H, W, C)")
        g = x.pow(2).sum((1, 2), keepdim=True).sqrt()
        return self.gamma * (x * g / (g.mean(-1, keepdim=True) + 1e-6)) + self.beta + x


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
        self.fc1, self.grn, self.fc2 = nn.Linear(c, 4 * c), GRN(4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(pad_to_window(x, 4)[..., :x.shape[-2], :x.shape[-1]]).permute(0, 2, 3, 1)
        y = self.fc2(self.grn(F.gelu(self.fc1(self.norm(y)))))
        y = layer_scale(y, self.gamma).permute(0, 3, 1, 2)
        return clamp_overflow(x + drop_path(y))


class Net(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, c, 4, 4), nn.Conv2d(c, 2 * c, 2, 2)
        self.blocks = nn.Sequential(Block(c), Block(c), Block(c))
        self.blocks2 = nn.Sequential(Block(2 * c), Block(2 * c))
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks2(self.down(self.blocks(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _models() -> dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]]:
    import transformers as T

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64)
    lm = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              use_cache=False)
    vit = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=64)
    return {
        "bert": lambda: (T.BertModel(T.BertConfig(**text)), (ids,)),
        "roberta": lambda: (T.RobertaModel(T.RobertaConfig(**text)), (ids,)),
        "electra": lambda: (T.ElectraModel(T.ElectraConfig(embedding_size=32, **text)), (ids,)),
        "albert": lambda: (T.AlbertModel(T.AlbertConfig(embedding_size=16, **text)), (ids,)),
        "distilbert": lambda: (T.DistilBertModel(T.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)), (ids,)),
        "deberta-v2": lambda: (T.DebertaV2Model(T.DebertaV2Config(**text)), (ids,)),
        "t5-encoder": lambda: (T.T5EncoderModel(T.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)), (ids,)),
        "gpt2": lambda: (T.GPT2Model(T.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False)),
            (ids,)),
        "gpt-neo": lambda: (T.GPTNeoModel(T.GPTNeoConfig(
            vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
            attention_types=[[["global", "local"], 1]], window_size=4, use_cache=False)), (ids,)),
        "opt": lambda: (T.OPTModel(T.OPTConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32, use_cache=False)),
            (ids,)),
        "llama": lambda: (T.LlamaModel(T.LlamaConfig(**lm)), (ids,)),
        "mistral": lambda: (T.MistralModel(T.MistralConfig(sliding_window=4, **lm)), (ids,)),
        "qwen2": lambda: (T.Qwen2Model(T.Qwen2Config(**lm)), (ids,)),
        "phi": lambda: (T.PhiModel(T.PhiConfig(**lm)), (ids,)),
        "vit": lambda: (T.ViTModel(T.ViTConfig(**vit), add_pooling_layer=False), (img,)),
        "deit": lambda: (T.DeiTModel(T.DeiTConfig(**vit), add_pooling_layer=False), (img,)),
        "beit": lambda: (T.BeitModel(T.BeitConfig(use_relative_position_bias=True, **vit)),
                         (img,)),
        "dinov2": lambda: (T.Dinov2Model(T.Dinov2Config(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=4, mlp_ratio=2)), (img,)),
        "swin": lambda: (T.SwinModel(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
            window_size=4)), (img,)),
        "convnext": lambda: (T.ConvNextModel(T.ConvNextConfig(
            num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)), (img,)),
        "resnet": lambda: (T.ResNetModel(T.ResNetConfig(
            num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
            layer_type="bottleneck")), (img,)),
        "regnet": lambda: (T.RegNetModel(T.RegNetConfig(
            num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
            groups_width=8)), (img,)),
        "mobilenet-v2": lambda: (T.MobileNetV2Model(T.MobileNetV2Config(
            image_size=32, depth_multiplier=0.25)), (img,)),
        "third-party-cnn": lambda: (Net(), (img,)),
        "segformer": lambda: (T.SegformerModel(T.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
            mlp_ratios=[2, 2])), (img,)),
    }


def worker(name: str, root: str) -> int:
    sys.path.insert(0, root)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(1)
    import fxfuse
    from fxfuse.testing import randomize_constants, uncovered_layers

    torch.manual_seed(0)
    model, inputs = _models()[name]()
    model = randomize_constants(model.eval(), seed=1)
    out: dict[str, Any] = {"name": name}
    start = time.perf_counter()
    try:
        spec = fxfuse.find_groups(model, inputs)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:90]}"
        print(json.dumps(out))
        return 0
    out["seconds"] = time.perf_counter() - start
    hidden = [n for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
              and (a := spec.axes.get((f"{n}.weight", 0))) is not None and a.size > 1
              and not any(r.startswith("output:") for r in a.fixed_because)]
    missing = uncovered_layers(model, spec)
    out.update(tracer=spec.tracer, hidden=len(hidden), covered=len(hidden) - len(missing),
               cuts=len(spec.cuts), probed=len(getattr(spec, "probed", [])),
               cut_ops=sorted({c.op for c in spec.cuts})[:4])
    try:
        fxfuse.verify(model, spec, inputs)
        out["verify"] = "ok"
    except Exception as exc:
        out["verify"] = f"FAILED: {' '.join(str(exc).split())[:60]}"
    print(json.dumps(out))
    return 0


@contextlib.contextmanager
def baseline_tree(rev: str | None) -> Iterator[Path | None]:
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="fxfuse-baseline-") as tmp:
        archive = subprocess.run(["git", "archive", rev, "fxfuse"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def cell(r: dict[str, Any] | None) -> str:
    if r is None or "error" in r:
        return f"error ({r['error'][:60]})" if r else "error"
    tr = "export" if "export" in r["tracer"] else "symbolic"
    return (f"{r['covered']}/{r['hidden']} ({tr}, {r['cuts']} cuts, {r.get('probed', 0)} probed, "
            f"verify {r['verify']}, {r['seconds']:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default=None, help="commit to compare with (git archive)")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--worker", nargs=2, metavar=("NAME", "ROOT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    names = args.only or list(_models())
    load_start, t0 = load_average(), time.perf_counter()
    rows: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = []
    with baseline_tree(args.baseline) as base:
        for name in names:
            after = run_child([__file__, "--worker", name, str(ROOT)], 600).data
            before = (run_child([__file__, "--worker", name, str(base)], 600).data
                      if base is not None else None)
            rows.append((name, before, after))
            print(f"{name}: before {cell(before)} | after {cell(after)}", flush=True)
    total = time.perf_counter() - t0

    def full(r: dict[str, Any] | None) -> bool:
        return r is not None and "error" not in r and r["covered"] == r["hidden"]

    def share(r: dict[str, Any] | None) -> tuple[int, int]:
        return (r["covered"], r["hidden"]) if r is not None and "error" not in r else (0, 0)

    cmd = "python benchmarks/transformer_coverage.py" + (
        f" --baseline {args.baseline}" if args.baseline else "") + " --write"
    lines = [BEGIN, "## Discovery coverage on Hugging Face families (issue 15)", "",
             f"{command_line(cmd)}, at {fxfuse_revision()}.", f"- {machine_line(1)}",
             load_line(load_start, total), "",
             "Hidden Linear/Conv layers whose output axis is in a group (`tracer=\"auto\"`, tiny "
             "random configs); cuts, probed calls, `fxfuse.verify`, discovery time.", "",
             f"| model | before ({args.baseline or '-'}) | after (this checkout) |",
             "|---|---|---|"]
    lines += [f"| {n} | {cell(b) if args.baseline else '-'} | {cell(a)} |" for n, b, a in rows]
    b_full = sum(full(b) for _, b, _ in rows)
    a_full = sum(full(a) for _, _, a in rows)
    b_cov = [sum(share(b)[i] for _, b, _ in rows) for i in (0, 1)]
    a_cov = [sum(share(a)[i] for _, _, a in rows) for i in (0, 1)]
    lines += ["", f"Models with every hidden layer in a group: before {b_full} of {len(rows)}, "
              f"after {a_full} of {len(rows)}; hidden layers covered: before "
              f"{b_cov[0]}/{b_cov[1]}, after {a_cov[0]}/{a_cov[1]}.", END]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
