"""Client splits (fxfuse.bench.splits): partitions, determinism, the stated skew in the counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxfuse.bench import SCHEMES, Split, fusion_set, split
from fxfuse.errors import InputError


def _labels(n_classes: int = 10, per_class: int = 120, seed: int = 0) -> np.ndarray:
    y = np.repeat(np.arange(n_classes), per_class)
    return np.random.default_rng(seed).permutation(y)


def _digits_labels() -> torch.Tensor:
    pytest.importorskip("sklearn")
    from fxfuse.data import load_digits_data

    return load_digits_data("train")[1]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_clients", [2, 4, 8])
def test_every_scheme_partitions_the_samples(scheme: str, n_clients: int) -> None:
    y = _digits_labels()
    s = split(y, n_clients, scheme, seed=3)
    every = np.concatenate(s.indices)
    assert every.size == y.shape[0]                                  # nothing lost ...
    assert np.array_equal(np.sort(every), np.arange(y.shape[0]))     # ... or duplicated
    assert all(ix.size > 0 for ix in s.indices)
    yn = y.numpy()
    for k, ix in enumerate(s.indices):                               # counts are the real counts
        assert np.array_equal(s.counts[k], [np.count_nonzero(yn[ix] == c) for c in s.classes])
    assert s.counts.sum() == y.shape[0]
    assert np.array_equal(s.counts.sum(axis=0), np.bincount(yn))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_split_is_deterministic_and_seeded(scheme: str) -> None:
    y = _labels()
    a, b = split(y, 4, scheme, seed=7), split(y, 4, scheme, seed=7)
    assert a == b and a.fingerprint == b.fingerprint
    assert all(np.array_equal(i, j) for i, j in zip(a.indices, b.indices))
    c = split(y, 4, scheme, seed=8)
    assert c != a
    assert split(torch.from_numpy(y), 4, scheme, seed=7) == a        # tensor or array labels


def test_split_json_round_trip_and_tamper_check() -> None:
    y = _labels()
    s = split(y, 4, "dirichlet-per-class", seed=1)
    back = Split.from_json(s.to_json())
    assert back == s and back.fingerprint == s.fingerprint
    assert back.concentrations is not None and s.concentrations is not None
    assert np.array_equal(back.concentrations, s.concentrations)
    assert back.describe() == s.describe()
    doc = s.to_dict()
    doc["indices"][1] = doc["indices"][1][1:] + [doc["indices"][0][0]]  # lose one, duplicate one
    import json

    with pytest.raises(InputError, match="partition"):
        Split.from_json(json.dumps(doc))
    with pytest.raises(InputError, match="Split JSON"):
        Split.from_json('{"scheme": "iid"}')


def test_dirichlet_per_class_ramp_shows_in_class_counts() -> None:
    # 60 classes x 400 samples, 4 clients: per class the concentrations are a permutation of
    # linspace(1, 5, 4); a client's expected share of a class is its concentration / 12.
    y = _labels(n_classes=60, per_class=400, seed=1)
    s = split(y, 4, "dirichlet-per-class", seed=0)
    ramp = np.linspace(1.0, 5.0, 4)
    assert s.params == {"concentration": [1.0, 5.0]}
    assert s.concentrations is not None and s.concentrations.shape == (60, 4)
    for row in s.concentrations:
        assert np.allclose(np.sort(row), ramp)
    assert len({tuple(r) for r in s.concentrations}) > 10            # permuted afresh per class
    shares = s.shares().T                                            # (classes, clients)
    mean_share = [shares[np.isclose(s.concentrations, a)].mean() for a in ramp]
    assert np.all(np.diff(mean_share) > 0.05)                        # more concentration, more data
    assert np.allclose(mean_share, ramp / ramp.sum(), atol=0.04)


def test_dirichlet_per_class_on_digits_favours_high_concentration() -> None:
    y = _digits_labels()
    s = split(y, 2, "dirichlet-per-class", seed=0)
    assert s.concentrations is not None
    big = s.concentrations.T == 5.0                                  # (clients, classes)
    assert s.counts[big].sum() > 3 * s.counts[~big].sum()


def test_dirichlet_alpha_controls_the_skew() -> None:
    y = _labels(n_classes=10, per_class=600)

    def mean_max_share(alpha: float) -> float:
        return float(split(y, 4, "dirichlet", alpha=alpha, seed=0).shares().max(axis=0).mean())

    assert mean_max_share(0.1) > 0.7                                 # classes sit on one client
    assert mean_max_share(100.0) < 0.35                              # near the even 0.25
    s = split(y, 4, "dirichlet", alpha=0.5, seed=2)
    assert s.params == {"alpha": 0.5, "min_size": 10}
    assert min(s.sizes) >= 10
    with pytest.raises(InputError, match="min_size"):
        split(y, 4, "dirichlet", alpha=0.5, min_size=5000)


def test_shards_give_disjoint_class_sets() -> None:
    y = _labels()
    s = split(y, 4, "shards", seed=0)
    assert s.client_classes is not None
    owned = [c for cs in s.client_classes for c in cs]
    assert sorted(owned) == list(range(10))                          # every class, once
    assert [len(cs) for cs in s.client_classes] == [3, 3, 2, 2]      # array_split of 10 over 4
    for k, cs in enumerate(s.client_classes):
        present = {c for c, n in zip(s.classes, s.counts[k]) if n}
        assert present == set(cs)
        assert all(s.counts[k][c] == 120 for c in cs)                # all of its classes
    with pytest.raises(InputError, match="classes"):
        split(y, 11, "shards")


def test_iid_deals_every_class_evenly() -> None:
    y = _labels(per_class=123)
    s = split(y, 4, "iid", seed=0)
    assert np.all(s.counts.max(axis=0) - s.counts.min(axis=0) <= 1)


def test_fusion_set_is_balanced_and_drawn_from_the_clients() -> None:
    y = _digits_labels()
    s = split(y, 4, "dirichlet-per-class", seed=0)
    f = fusion_set(s, y, 400, seed=0)
    assert f.size == 400 and np.unique(f).size == 400
    counts = np.bincount(y.numpy()[f], minlength=10)
    assert counts.min() == 40 and counts.max() == 40
    assert np.array_equal(f, fusion_set(s, y, 400, seed=0))
    assert not np.array_equal(f, fusion_set(s, y, 400, seed=1))
    sh = split(y, 4, "shards", seed=0)
    assert sh.client_classes is not None
    only0 = fusion_set(sh, y, 90, clients=[0])
    assert set(only0.tolist()) <= set(sh.indices[0].tolist())
    c0 = np.bincount(y.numpy()[only0], minlength=10)
    assert set(np.flatnonzero(c0)) == set(sh.client_classes[0])
    assert c0.max() - c0[c0 > 0].min() <= 1                          # balanced over its classes
    # more than a class holds: the rest goes round-robin to the classes that still have samples
    tiny = split(np.array([0] * 5 + [1] * 50), 1, "iid")
    g = fusion_set(tiny, np.array([0] * 5 + [1] * 50), 20)
    assert np.bincount(np.array([0] * 5 + [1] * 50)[g]).tolist() == [5, 15]


@pytest.mark.parametrize("bad", [
    lambda y: split(y.astype(float), 2),
    lambda y: split(y.reshape(2, -1), 2),
    lambda y: split(y, 0),
    lambda y: split(y, 2, "label-skew"),
    lambda y: split(y, 2, "dirichlet", alpha=0.0),
    lambda y: split(y, 2, concentration=(0.0, 5.0)),
    lambda y: fusion_set(split(y, 2), y[::-1].copy(), 10),
    lambda y: fusion_set(split(y, 2), y, 10**6),
    lambda y: fusion_set(split(y, 2), y, 10, clients=[5]),
    lambda y: split(y, 2).subset(0, torch.zeros(3)),
])
def test_bad_input_is_a_typed_error(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError):
        bad(_labels())
