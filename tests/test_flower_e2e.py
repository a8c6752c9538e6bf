"""One run on Flower's deployment engine: a SuperLink and 3 SuperNodes on 127.0.0.1, the example
app (examples/flower_app) for one round on digits, every client from its own initialisation.

Stated margin: the fused global model's accuracy must beat the plain weighted average of the
same three replies (what FedAvg would give) by at least 0.20.  Measured when this test was
written: fused ~0.65, average ~0.22 (3 Dirichlet(0.5) clients, MLP 64-64-64-10).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fxfuse.flower.local import FederationError, LocalFederation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_app"
MARGIN = 0.20
TIMEOUT_S = 240  # the bound: start-up waits 60 s at most, the run (submit to results) this


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks read /proc")
def test_one_round_on_the_deployment_engine_beats_the_plain_average(tmp_path: Path) -> None:
    app = tmp_path / "app"  # a copy: `flwr run` must not touch the repository's files
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    fed = LocalFederation(3, tmp_path / "federation")
    try:
        fed.start()
        results = fed.run(app, {
            "dataset": "digits", "hidden": 64, "split": "dirichlet", "alpha": 0.5,
            "num-partitions": 3, "local-epochs": 20, "batch-size": 32, "seed": 0,
            "num-server-rounds": 1, "client-init": "local", "align": "weight",
            "calibration-size": 100, "output-dir": str(out)},
            results=out / "results.json", timeout=TIMEOUT_S)
        assert fed.pids(), "the federation's processes were not seen while it ran"
    finally:
        left = fed.stop()
    assert left == [], f"processes left running: {left}"
    last = results["rounds"][-1]
    print(f"fused {last['accuracy']:.3f}, plain average {last['average_accuracy']:.3f}, "
          f"{results['seconds']:.0f} s in the ServerApp")
    assert last["round"] == 1 and len(last["used"]) == 3 and last["excluded"] == []
    assert last["accuracy"] >= last["average_accuracy"] + MARGIN, last
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["global.pt", "round-000.pt",
                                                                   "round-001.pt"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks read /proc")
def test_a_run_whose_server_app_fails_is_reported_at_once_with_its_exception(
        tmp_path: Path) -> None:
    """A ServerApp that raises (here: an unknown alignment method in the run config) ends the
    run as ``finished:failed``; ``run`` says so with the exception, within seconds of the
    status turning, not after its timeout."""
    app = tmp_path / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    fed = LocalFederation(1, tmp_path / "federation")
    try:
        fed.start()
        start = time.monotonic()
        with pytest.raises(FederationError, match=r"finished:failed.*no-such-method"):
            fed.run(app, {"dataset": "digits", "num-partitions": 1, "align": "no-such-method",
                          "output-dir": str(tmp_path / "out")},
                    results=tmp_path / "out" / "results.json", timeout=TIMEOUT_S)
        waited = time.monotonic() - start
    finally:
        left = fed.stop()
    assert left == [], f"processes left running: {left}"
    assert waited < TIMEOUT_S / 2, f"the failure was noticed only after {waited:.0f} s"
