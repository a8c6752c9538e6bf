"""fxfuse.export(): ONNX parity on the zoo, state_dict round trips, atomic writes, no mutation."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fxfuse.export_onnx as fx_onnx
import models
from fxfuse.errors import ExportError, InputError
from fxfuse.exporter import ExportReport, export

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

_REAL_ONNX_EXPORT = torch.onnx.export


class TiedLM(nn.Module):
    """Embedding whose weight is shared with the output projection (weight tying)."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mix(self.emb(tokens))))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention: the legacy exporter needs the fused fastpath off for it."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.attn(x, x, x, need_weights=False)[0])


def _tied_lm() -> tuple[TiedLM, torch.Tensor]:
    torch.manual_seed(0)
    return TiedLM(), torch.randint(0, 11, (2, 5))


def _small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.randn(6, 4)


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key


def _no_dynamo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the dynamo exporter raise; the legacy exporter still works."""

    def fake_export(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo exporter failure")
        return _REAL_ONNX_EXPORT(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fake_export)


# --- ONNX parity ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", models.names())
def test_onnx_parity_zoo(name: str, tmp_path: Path) -> None:
    entry = models.get(name)
    model = entry.factory()
    inputs = entry.example_inputs()
    report = export(model, inputs, tmp_path / "m.onnx", check=True)
    assert isinstance(report, ExportReport)
    assert report.format == "onnx" and report.exporter in ("dynamo", "legacy")
    assert report.max_rel_diff is not None and report.max_rel_diff < 1e-4, (name, report)
    assert report.dynamic_batch and len(report.checked_batches) == 2, (name, report.notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_onnx_tied_int_inputs(tmp_path: Path) -> None:
    model, tokens = _tied_lm()
    report = export(model, tokens, tmp_path / "lm.onnx")
    assert report.exporter == "dynamo"
    assert report.max_rel_diff is not None and report.max_rel_diff < 1e-4


def test_onnx_legacy_fallback_multihead_attention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = AttentionNet().eval()
    x = torch.randn(2, 5, 16)
    _no_dynamo(monkeypatch)
    # Under no_grad in eval mode attention takes its fused fastpath, which the legacy exporter
    # cannot export unless export() switches the fastpath off around it.
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="legacy"):
        report = export(model, (x,), tmp_path / "attn.onnx")
    assert report.exporter == "legacy"
    assert report.max_rel_diff is not None and report.max_rel_diff < 1e-4
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attn.onnx"]


def test_onnx_check_false(tmp_path: Path) -> None:
    model, x = _small()
    report = export(model, x, str(tmp_path / "m.onnx"), check=False)
    assert report.max_rel_diff is None and (tmp_path / "m.onnx").is_file()


# --- state_dict formats -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip_tied(suffix: str, tmp_path: Path) -> None:
    model, tokens = _tied_lm()
    target = tmp_path / f"lm{suffix}"
    report = export(model, tokens, target)
    assert report.format == suffix[1:] and report.max_rel_diff == 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]

    if suffix == ".pt":
        loaded = torch.load(target, weights_only=True)
    else:
        from safetensors.torch import load_file

        loaded = load_file(target)
    torch.manual_seed(123)
    fresh = TiedLM()
    assert fresh.out.weight is fresh.emb.weight
    fresh.load_state_dict(loaded)  # strict
    assert fresh.out.weight is fresh.emb.weight  # still tied
    _assert_state_equal(fresh, _state_copy(model))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip_zoo(suffix: str, tmp_path: Path) -> None:
    entry = models.get("vgg_bn")
    model = entry.factory()
    export(model, entry.example_inputs(), tmp_path / f"w{suffix}")
    if suffix == ".pt":
        loaded = torch.load(tmp_path / f"w{suffix}", weights_only=True)
    else:
        from safetensors.torch import load_file

        loaded = load_file(tmp_path / f"w{suffix}")
    fresh = entry.factory()
    for p in fresh.parameters():
        nn.init.zeros_(p)
    fresh.load_state_dict(loaded)
    _assert_state_equal(fresh, _state_copy(model))


def test_safetensors_non_contiguous_and_views(tmp_path: Path) -> None:
    model = nn.Linear(4, 6)
    with torch.no_grad():
        model.weight = nn.Parameter(torch.randn(4, 6).t())  # non-contiguous
    model.register_buffer("part", torch.arange(10.0)[2:7])  # view of a larger storage
    export(model, torch.randn(1, 4), tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "m.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


# --- atomicity and errors ---------------------------------------------------------------------


def test_unsupported_suffix(tmp_path: Path) -> None:
    model, x = _small()
    with pytest.raises(InputError, match=r"\.onnx.*\.pt.*\.safetensors"):
        export(model, x, tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []


def test_missing_folder(tmp_path: Path) -> None:
    model, x = _small()
    with pytest.raises(InputError, match="does not exist"):
        export(model, x, tmp_path / "nope" / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _small()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import raises ImportError
    with pytest.raises(InputError, match="pip install onnxscript"):
        export(model, x, tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(InputError, match="pip install safetensors"):
        export(model, x, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_both_exporters_fail_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        path = Path(args[2])
        path.write_bytes(b"partial")  # a half-written file must not survive
        raise RuntimeError(f"simulated failure (dynamo={kwargs.get('dynamo')})")

    monkeypatch.setattr(torch.onnx, "export", broken)
    model, x = _small()
    with pytest.raises(ExportError, match="both exporters"):
        export(model, x, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".safetensors"])
def test_failed_check_leaves_existing_file(suffix: str, tmp_path: Path) -> None:
    model, x = _small()
    target = tmp_path / f"m{suffix}"
    # no file before: nothing after
    with pytest.raises(ExportError, match="tolerance"):
        export(model, x, target, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
    # a file before: unchanged after
    target.write_bytes(b"previous contents")
    with pytest.raises(ExportError, match="tolerance"):
        export(model, x, target, tolerance=-1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    assert target.read_bytes() == b"previous contents"
    # and a successful export replaces it
    export(model, x, target)
    assert target.read_bytes() != b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_onnx_mismatch_names_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _small()
    monkeypatch.setattr(fx_onnx, "rel_diff", lambda ref, got: 0.5)
    with pytest.raises(ExportError, match=r"output 0 .*0\.5"):
        export(model, x, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["export", "check"])
def test_keyboard_interrupt_leaves_nothing(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(*args, **kwargs):
        if stage == "export":
            Path(args[2]).write_bytes(b"partial")
        raise KeyboardInterrupt

    if stage == "export":
        monkeypatch.setattr(torch.onnx, "export", interrupt)
    else:
        monkeypatch.setattr(fx_onnx, "_check_onnx", interrupt)
    model, x = _small()
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous contents")
    with pytest.raises(KeyboardInterrupt):
        export(model, x, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert target.read_bytes() == b"previous contents"


# --- the model is not modified ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".safetensors"])
@pytest.mark.parametrize("fail", [False, True])
def test_model_not_mutated(suffix: str, fail: bool, tmp_path: Path) -> None:
    entry = models.get("vgg_bn")
    model = entry.factory().train()
    model.features[1].eval()  # a mixed state must come back exactly  # type: ignore[index]
    flags = {name: m.training for name, m in model.named_modules()}
    state = _state_copy(model)
    grads_before = [p.requires_grad for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fail:
            with pytest.raises(ExportError):
                export(model, entry.example_inputs(), tmp_path / f"m{suffix}", tolerance=-1.0)
        else:
            export(model, entry.example_inputs(), tmp_path / f"m{suffix}")
    _assert_state_equal(model, state)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert [p.requires_grad for p in model.parameters()] == grads_before
    assert all(p.grad is None for p in model.parameters())


# --- deployable ONNX: dynamic batch, names, Hugging Face inputs ---------------------------------


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run_at(session, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [torch.as_tensor(o) for o in session.run(None, {k: v.numpy() for k, v in feeds.items()})]


@pytest.mark.parametrize("example_batch", [1, 2])
def test_onnx_batch_axis_is_dynamic_and_inputs_are_named(example_batch: int,
                                                          tmp_path: Path) -> None:
    from tests.cli_models import two_inputs

    model = two_inputs().eval()
    ids, feats = torch.randint(0, 10, (example_batch, 5)), torch.randn(example_batch, 5, 4)
    report = export(model, (ids, feats), tmp_path / "m.onnx")
    assert report.dynamic_batch and report.input_names == ("ids", "feats"), report
    assert report.output_names == ("output",) and report.checked_batches[0] == example_batch
    session = _session(tmp_path / "m.onnx")
    assert [i.name for i in session.get_inputs()] == ["ids", "feats"]
    assert [i.shape[0] for i in session.get_inputs()] == ["batch", "batch"]
    for batch in (3, 7):  # neither the example's nor the trace's size
        feeds = {"ids": torch.randint(0, 10, (batch, 5)), "feats": torch.randn(batch, 5, 4)}
        (got,) = _run_at(session, feeds)
        with torch.no_grad():
            torch.testing.assert_close(got, model(*feeds.values()), rtol=1e-4, atol=1e-5)


def test_onnx_static_shapes_on_request(tmp_path: Path) -> None:
    model, x = _small()
    report = export(model, x, tmp_path / "m.onnx", dynamic_batch=False)
    assert not report.dynamic_batch and report.checked_batches == (6,)
    assert _session(tmp_path / "m.onnx").get_inputs()[0].shape == [6, 4]


def test_onnx_model_that_fixes_its_batch_size_gets_static_shapes(tmp_path: Path) -> None:
    from tests.cli_models import fixed_batch

    model = fixed_batch()
    report = export(model, torch.randn(2, 2, 4), tmp_path / "m.onnx")
    assert not report.dynamic_batch and report.checked_batches == (2,)
    assert any("fixes the batch size to 2" in n for n in report.notes), report.notes
    assert "static shapes" in report.summary()
    assert _session(tmp_path / "m.onnx").get_inputs()[0].shape == [2, 2, 4]


def test_state_dict_export_reports_no_onnxruntime(tmp_path: Path) -> None:
    model, x = _small()
    for suffix in (".pt", ".safetensors"):
        text = export(model, x, tmp_path / f"m{suffix}").summary()
        assert "onnxruntime" not in text and "state_dict" in text


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".safetensors"])
def test_written_files_follow_the_umask(suffix: str, umask: int, tmp_path: Path) -> None:
    model, x = _small()
    old = os.umask(umask)
    try:
        export(model, x, tmp_path / f"m{suffix}")
    finally:
        os.umask(old)
    assert (tmp_path / f"m{suffix}").stat().st_mode & 0o777 == 0o666 & ~umask


def _tiny_bert():  # type: ignore[no-untyped-def]
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=64)
    return T.BertModel(cfg).eval()


def test_onnx_hugging_face_encoder_takes_an_attention_mask(tmp_path: Path) -> None:
    model = _tiny_bert()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    report = export(model, ids, tmp_path / "bert.onnx")
    assert report.input_names == ("input_ids", "attention_mask") and report.dynamic_batch
    assert report.output_names == ("last_hidden_state", "pooler_output")
    session = _session(tmp_path / "bert.onnx")
    for batch in (1, 5):
        feeds = {"input_ids": torch.randint(0, 100, (batch, 8)),
                 "attention_mask": torch.ones(batch, 8, dtype=torch.int64)}
        feeds["attention_mask"][0, 5:] = 0  # a padded sequence
        got = _run_at(session, feeds)
        with torch.no_grad():
            ref = model(**feeds)
        torch.testing.assert_close(got[0], ref.last_hidden_state, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], ref.pooler_output, rtol=1e-4, atol=1e-5)
    # the mask is used: padding changes the unpadded positions' outputs of a padded row
    unpadded = _run_at(session, {"input_ids": feeds["input_ids"],
                                 "attention_mask": torch.ones(5, 8, dtype=torch.int64)})[0]
    assert not torch.allclose(unpadded[0, :5], got[0][0, :5], atol=1e-4)


def test_onnx_causal_lm_exported_without_touching_its_cache_setting(tmp_path: Path) -> None:
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64)
    model = T.LlamaForCausalLM(cfg).eval()
    assert model.config.use_cache
    ids = torch.randint(0, 100, (2, 6))
    report = export(model, ids, tmp_path / "lm.onnx")
    assert model.config.use_cache  # untouched
    assert report.output_names == ("logits",) and report.dynamic_batch
    assert any("use_cache=False" in n for n in report.notes), report.notes
