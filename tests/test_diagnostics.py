"""neuron_disturbance: zero where the fused model computes a parent's units exactly, large where
it does not, measured in the fused basis through each parent's map."""

from __future__ import annotations

import pytest
import torch

import fxfuse
import models
from fxfuse.diagnostics import neuron_disturbance
from fxfuse.passes import FusionReport
from fxfuse.testing import randomize_constants
from tests.regression.fusion_cases import batches, unrelated


@pytest.mark.parametrize("name", ["resnet20", "sdpa_net", "llama_lm"])
def test_a_fused_permuted_copy_disturbs_nothing(name: str) -> None:
    entry = models.get(name)
    a = randomize_constants(entry.factory(), seed=3)
    x = entry.example_inputs()
    spec = fxfuse.find_groups(a, x)
    b = fxfuse.permute(a, spec, spec.random_perms(seed=4))
    report = FusionReport()
    fused = fxfuse.fuse([a, b], x, progress=False, report=report)
    data = [batches(name, 2), batches(name, 2)]
    dist = neuron_disturbance(fused, [a, b], report.spec, report.maps, data)  # type: ignore[arg-type]
    assert dist[0] and set(dist[0]) <= {g.name for g in spec.groups}
    assert max(max(d.values()) for d in dist) < 1e-5, dist
    # without its map, the copy's units are read in the wrong order: the figure shows it
    wrong = neuron_disturbance(fused, [a, b], report.spec, None, data)  # type: ignore[arg-type]
    assert max(wrong[1].values()) > 0.1


def test_unrelated_parents_are_disturbed_and_naive_averaging_more() -> None:
    a, b = unrelated("mlp", 1), unrelated("mlp", 12)
    x = models.get("mlp").example_inputs()
    data = [batches("mlp", 2), batches("mlp", 2)]
    aligned_report, naive_report = FusionReport(), FusionReport()
    aligned = fxfuse.fuse([a, b], x, progress=False, report=aligned_report)
    naive = fxfuse.fuse([a, b], x, align=None, progress=False, report=naive_report)
    d_aligned = neuron_disturbance(aligned, [a, b], aligned_report.spec,  # type: ignore[arg-type]
                                   aligned_report.maps, data)
    d_naive = neuron_disturbance(naive, [a, b], naive_report.spec, None, data)  # type: ignore[arg-type]
    for k in range(2):
        assert min(d_aligned[k].values()) > 0.05  # two different networks: every group moves
        mean_a = sum(d_aligned[k].values()) / len(d_aligned[k])
        mean_n = sum(d_naive[k].values()) / len(d_naive[k])
        assert mean_a < mean_n, (k, mean_a, mean_n)  # alignment disturbs the units less


def test_one_data_set_per_parent() -> None:
    a = models.get("mlp").factory()
    x = models.get("mlp").example_inputs()
    spec = fxfuse.find_groups(a, x)
    with pytest.raises(fxfuse.InputError, match="one data set per parent"):
        neuron_disturbance(a, [a, a], spec, None, [batches("mlp", 1)])
    with torch.no_grad():
        assert neuron_disturbance(a, [a], spec, None, [batches("mlp", 1)])[0]
