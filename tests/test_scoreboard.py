"""The scoreboard (fxfuse.bench.scoreboard, benchmarks/scoreboard.py) end to end on a tiny
setting: digits, 2 clients, one epoch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fxfuse.bench import Budget, ModelSpec, datasets
from fxfuse.bench.methods import METHODS, Context, Ensemble, NotApplicable
from fxfuse.bench.scoreboard import (
    Setting,
    default_model,
    evaluate,
    render_summary,
    render_table,
    run_setting,
)
from fxfuse.errors import InputError

MLP = "models.zoo:mlp_classifier"


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    pytest.importorskip("sklearn")
    return datasets.load("digits")


def test_tiny_setting_scores_every_row(digits: datasets.Dataset, tmp_path: Path) -> None:
    setting = Setting("digits", 2, budget=Budget(epochs=1, batch_size=32))
    table = run_setting(setting, digits, cache_dir=tmp_path)
    names = [r.name for r in table.rows]
    assert names[:3] == [f"client 0 ({table.split.sizes[0]} samples)",
                         f"client 1 ({table.split.sizes[1]} samples)",
                         "best client (oracle: by test acc)"]
    assert names[3:] == list(METHODS)
    for row in table.rows:
        for init in ("different", "common"):
            cell = row.cells[init]
            assert cell.acc is not None and cell.loss is not None, (row.name, init, cell.note)
            assert 0.0 <= cell.acc <= 1.0 and cell.seconds is not None
    for init in ("different", "common"):
        clients = table.clients[init]
        accs = [evaluate(c.model, digits.test_x, digits.test_y)[0] for c in clients]
        assert table.row("best client (oracle: by test acc)").cells[init].acc == max(accs)
        ens = evaluate(Ensemble([c.model for c in clients]), digits.test_x, digits.test_y)
        assert table.row("logit ensemble").cells[init].acc == ens[0]
    # one epoch already separates the clients; the tables say which init each column used
    text = "\n".join(render_table(table))
    assert "different init: test acc %" in text and "common init: test acc %" in text
    assert "1 epoch, batch 32, Adam(lr=0.001)" in text
    counts = table.split.counts
    assert f"| 0 | {counts[0][0]} [" in text and f" | {counts[1].sum()} |" in text
    summary = "\n".join(render_summary([table]))
    assert summary.count("\n") == 3 and "digits, 2 clients" in summary
    best_method = max((r for r in table.rows if r.kind == "method"),
                      key=lambda r: r.cells["different"].acc or 0.0)
    assert summary.rstrip().endswith(
        f"| {best_method.name} {100 * (best_method.cells['different'].acc or 0):.2f} |")
    # the clients came from the cache the second time, with the same scores
    again = run_setting(setting, digits, cache_dir=tmp_path)
    assert all(c.cached for cs in again.clients.values() for c in cs)
    assert again.row("weight matching").cells["different"].acc == \
        table.row("weight matching").cells["different"].acc


def test_common_init_without_training_averages_to_the_init(digits: datasets.Dataset) -> None:
    # Identical clients: every averaging method must give back the client itself.
    setting = Setting("digits", 3, budget=Budget(epochs=0), inits=("common",))
    table = run_setting(setting, digits, cache=False)
    client = table.row(f"client 0 ({table.split.sizes[0]} samples)").cells["common"]
    for name in ("vanilla average", "weight matching", "activation matching", "logit ensemble"):
        cell = table.row(name).cells["common"]
        assert cell.acc == client.acc and cell.loss == pytest.approx(client.loss, abs=1e-5)


def test_methods_that_do_not_apply_say_why(digits: datasets.Dataset) -> None:
    specs = (ModelSpec(MLP, {"in_dim": 64, "widths": [16]}),
             ModelSpec(MLP, {"in_dim": 64, "widths": [24]}))
    setting = Setting("digits", 2, models=specs, budget=Budget(epochs=1),
                      inits=("different",), label="mixed widths")
    table = run_setting(setting, digits, cache=False)
    for name in ("vanilla average", "weight matching", "activation matching + REPAIR"):
        note = table.row(name).cells["different"].note
        assert note.startswith("n/a: clients differ in width") and "16x64" in note, note
    assert table.row("logit ensemble").cells["different"].acc is not None
    text = "\n".join(render_table(table))
    assert "| weight matching | n/a: clients differ in width" in text
    assert "common init" not in text


def test_a_registered_row_runs_and_its_failures_show(digits: datasets.Dataset) -> None:
    def first_client(ctx: Context) -> nn.Module:
        assert ctx.fusion_x.shape[0] == 400 and ctx.weights == pytest.approx(
            [n / sum(ctx.split.sizes) for n in ctx.split.sizes])
        return ctx.models[0]

    def not_here(ctx: Context) -> nn.Module:
        raise NotApplicable("needs three clients")

    def breaks(ctx: Context) -> nn.Module:
        raise InputError("bad config\nsecond line")

    def crashes(ctx: Context) -> nn.Module:
        return ctx.models[5]

    def vandal(ctx: Context) -> nn.Module:
        with torch.no_grad():
            next(ctx.models[0].parameters()).zero_()
        return ctx.models[0]

    methods = {"first client": first_client, "not here": not_here, "breaks": breaks,
               "crashes": crashes, "vandal": vandal, "first client again": first_client}
    setting = Setting("digits", 2, budget=Budget(epochs=1), inits=("different",))
    table = run_setting(setting, digits, methods, cache=False)
    cell = lambda name: table.row(name).cells["different"]  # noqa: E731
    c0 = table.row(f"client 0 ({table.split.sizes[0]} samples)").cells["different"]
    assert cell("first client").acc == c0.acc
    assert cell("not here").note == "n/a: needs three clients"
    assert cell("breaks").note == "failed: InputError: bad config"
    assert cell("crashes").note == "failed: IndexError: list index out of range"
    assert cell("vandal").note.startswith("failed: the method modified the client models")
    assert cell("first client again").acc == c0.acc                  # restored after the vandal


def test_script_writes_only_its_section(digits: datasets.Dataset, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import scoreboard

    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n")
    args = ["--tiny", "--write", "--results", str(results), "--cache-dir", str(tmp_path / "c"),
            "--quiet"]
    assert scoreboard.main(args) == 0
    text = results.read_text()
    assert "keep me" in text and text.count(scoreboard.BEGIN) == 1
    assert "### digits, 2 clients, per-class Dirichlet" in text and "failed" not in text
    assert scoreboard.main(args) == 0                                # re-run replaces it
    assert results.read_text().count(scoreboard.BEGIN) == 1
    assert "| logit ensemble |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        scoreboard.main(["--tiny", "--write"])                       # would clobber the real one


def test_unknown_names_are_typed_errors() -> None:
    with pytest.raises(InputError, match="unknown dataset"):
        datasets.load("cifar10")
    with pytest.raises(InputError, match="no default model"):
        default_model("cifar10")
    with pytest.raises(InputError, match="unknown init"):
        Setting("digits", 2, inits=("shared",))
