"""Client training (fxfuse.bench.clients): budget, determinism, inits, the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fxfuse.bench import Budget, ModelSpec, client_weights, split, train_client, train_clients
from fxfuse.errors import InputError

MLP = "models.zoo:mlp_classifier"


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    pytest.importorskip("sklearn")
    from fxfuse.data import load_digits_data

    return load_digits_data("train")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_deterministic_and_learns(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    s = split(y, 2, "iid", seed=0)
    spec = ModelSpec(MLP, {"in_dim": 64, "widths": [32]})
    budget = Budget(epochs=6, batch_size=32, lr=1e-2)
    a = train_clients(x, y, s, spec, budget, seed=0, cache=False)
    b = train_clients(x, y, s, spec, budget, seed=0, cache=False)
    assert all(_same(i.model, j.model) for i, j in zip(a, b))
    assert not any(c.cached for c in a) and not list(tmp_path.iterdir())
    for c in a:                                          # it learned its own data
        xk, yk = s.subset(c.index, x, y)
        with torch.no_grad():
            acc = (c.model(xk).argmax(1) == yk).float().mean().item()
        assert acc > 0.95 and c.final_loss < 0.2
        assert not c.model.training
    assert [c.n_samples for c in a] == list(s.sizes)
    assert client_weights(a) == pytest.approx([n / sum(s.sizes) for n in s.sizes])


def test_common_and_different_inits(digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    s = split(y, 3, "dirichlet-per-class", seed=0)
    spec = ModelSpec(MLP, {"in_dim": 64, "widths": [16]})
    zero = Budget(epochs=0)
    common = train_clients(x, y, s, spec, zero, seed=5, init="common", cache=False)
    diff = train_clients(x, y, s, spec, zero, seed=5, init="different", cache=False)
    assert [c.init_seed for c in common] == [5, 5, 5]
    assert [c.init_seed for c in diff] == [5, 6, 7]
    assert _same(common[0].model, common[1].model) and _same(common[1].model, common[2].model)
    assert not _same(diff[0].model, diff[1].model)
    assert _same(common[0].model, diff[0].model)          # seed + 0 == seed
    trained = train_clients(x, y, s, spec, Budget(epochs=1), seed=5, init="common", cache=False)
    assert not _same(trained[0].model, trained[1].model)  # same start, own data


def test_cache_hits_misses_and_recovers(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    s = split(y, 2, "shards", seed=0)
    spec = ModelSpec(MLP, {"in_dim": 64, "widths": [16]})
    budget = Budget(epochs=1)
    first = train_clients(x, y, s, spec, budget, cache_dir=tmp_path)
    assert [c.cached for c in first] == [False, False]
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not list(tmp_path.glob("*.tmp"))
    again = train_clients(x, y, s, spec, budget, cache_dir=tmp_path)
    assert [c.cached for c in again] == [True, True]
    assert all(_same(i.model, j.model) for i, j in zip(first, again))
    assert [c.train_seconds for c in again] == [c.train_seconds for c in first]
    assert [c.key for c in again] == [c.key for c in first]
    # every part of the key matters
    other = [
        train_clients(x, y, s, spec, Budget(epochs=2), cache_dir=tmp_path),
        train_clients(x, y, s, ModelSpec(MLP, {"in_dim": 64, "widths": [17]}), budget,
                      cache_dir=tmp_path),
        train_clients(x, y, split(y, 2, "shards", seed=1), spec, budget, cache_dir=tmp_path),
        train_clients(x, y, s, spec, budget, seed=1, cache_dir=tmp_path),
        train_clients(x, y, s, spec, budget, init="common", cache_dir=tmp_path),
    ]
    # init="common" client 0 starts from seed + 0 like the "different" client 0: same entry
    assert [c.cached for run in other for c in run] == [False] * 8 + [True, False]
    assert len({c.key for run in [first, *other] for c in run}) == 2 + 2 * len(other) - 1
    # a corrupt entry is retrained and replaced, with a warning
    path = tmp_path / f"{first[0].key}.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        fixed = train_clients(x, y, s, spec, budget, cache_dir=tmp_path)
    assert [c.cached for c in fixed] == [False, True] and _same(fixed[0].model, first[0].model)
    assert train_clients(x, y, s, spec, budget, cache_dir=tmp_path)[0].cached


def test_clients_may_have_their_own_widths(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    s = split(y, 2, "dirichlet", seed=0)
    specs = [ModelSpec(MLP, {"in_dim": 64, "widths": [8]}),
             ModelSpec(MLP, {"in_dim": 64, "widths": [24, 12]})]
    cs = train_clients(x, y, s, specs, Budget(epochs=1), cache_dir=tmp_path)
    assert cs[0].model.state_dict()["head.weight"].shape == (10, 8)
    assert cs[1].model.state_dict()["head.weight"].shape == (10, 12)
    assert cs[1].spec.describe() == "mlp_classifier(in_dim=64, widths=[24, 12])"


def test_train_client_leaves_its_input_alone(digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    model = ModelSpec(MLP, {"in_dim": 64, "widths": [8]}).build(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, loss = train_client(model, x[:64], y[:64], Budget(epochs=1), seed=0)
    assert trained is not model and loss > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_spec_of_a_function() -> None:
    from models.zoo import mlp_classifier

    spec = ModelSpec.of(mlp_classifier, in_dim=64, widths=[8])
    assert spec == ModelSpec("models.mlp:mlp_classifier", {"in_dim": 64, "widths": [8]})
    assert spec.build(0).state_dict()["head.weight"].shape == (10, 8)
    with pytest.raises(InputError, match="module-level"):
        ModelSpec.of(lambda: torch.nn.Linear(2, 2))


def test_bad_input_is_a_typed_error(digits, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, y = digits
    s = split(y, 2, seed=0)
    spec = ModelSpec(MLP, {"in_dim": 64, "widths": [8]})
    cases = [
        lambda: train_clients(x[:-1], y[:-1], s, spec, cache_dir=tmp_path),
        lambda: train_clients(x, y.flip(0), s, spec, cache_dir=tmp_path),
        lambda: train_clients(x, y, s, [spec], cache_dir=tmp_path),
        lambda: train_clients(x, y, s, spec, init="shared", cache_dir=tmp_path),
        lambda: ModelSpec(MLP, {"seed": 3}),
        lambda: ModelSpec(MLP, {"widths": object()}),
        lambda: ModelSpec("models.zoo.mlp_classifier").build(0),
        lambda: ModelSpec("models.nope:mlp").build(0),
        lambda: ModelSpec("models.zoo:no_such_factory").build(0),
        lambda: Budget(epochs=-1),
        lambda: Budget(optimizer="lbfgs"),
        lambda: Budget(lr=0.0),
    ]
    for case in cases:
        with pytest.raises(InputError):
            case()
    assert not list(tmp_path.iterdir())
