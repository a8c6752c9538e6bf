"""The rules stage's shortcuts give what the general code gives (discovery's driver and atom
table): the state walk is ``state_dict(keep_vars=True)``, a leaf module's tensors are its
``named_parameters`` + ``named_buffers``, the atom-atom unify is the general unify."""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.groups.discover import _named_tensors, _state_tensors
from fxfuse.ir.layout import Atom, AtomTable, Prod, Reason
from fxfuse.rules import AxisRef, TensorHandle


class _Tied(nn.Module):
    """Tied weights, a shared submodule, a None parameter, persistent and non-persistent
    buffers, nesting."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("dropped", torch.ones(2), persistent=False)
        self.register_parameter("absent", None)
        self.shared = self.a
        self.seq = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))


class _Extra(nn.Linear):
    def get_extra_state(self) -> Any:
        return {"note": 1}

    def set_extra_state(self, state: Any) -> None:
        pass


def _same_state(model: nn.Module) -> None:
    # state_dict's tensors (extra state a module returns as a Python object has no axes)
    want = {k: t for k, t in model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor)}
    got = _state_tensors(model)
    assert list(got) == list(want)
    assert all(got[k] is want[k] if isinstance(want[k], torch.Tensor) else got[k] == want[k]
               for k in want)


def test_state_walk_is_state_dict() -> None:
    _same_state(_Tied())
    _same_state(nn.Sequential(_Tied(), nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))))


def test_state_walk_defers_to_hooks_and_extra_state() -> None:
    m = _Tied()

    def rename(module: nn.Module, sd: OrderedDict[str, Any], prefix: str, local: Any) -> None:
        sd[prefix + "renamed"] = sd.pop(prefix + "weight")

    m.seq[1]._register_state_dict_hook(rename)
    _same_state(m)
    assert "seq.1.renamed" in _state_tensors(m)
    e = nn.Sequential(_Extra(2, 2))
    _same_state(e)
    assert list(_state_tensors(e)) == ["0.weight", "0.bias"]  # state_dict, not the walk
    # discovery of a model with such extra state (it raised AttributeError: no .shape)
    assert fxfuse.find_groups(nn.Sequential(_Extra(2, 3), nn.ReLU(), nn.Linear(3, 2)),
                              torch.randn(4, 2)).groups


def test_state_walk_defers_to_an_instance_state_dict() -> None:
    m = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    real = m.state_dict

    def hide_bias(*args: Any, **kwargs: Any) -> Any:
        sd = real(*args, **kwargs)
        sd.pop("2.bias")
        return sd

    m.state_dict = hide_bias  # type: ignore[method-assign]
    assert list(_state_tensors(m)) == ["0.weight", "0.bias", "2.weight"]
    child = nn.Linear(3, 2)
    child._save_to_state_dict = lambda *a, **k: None  # type: ignore[method-assign]
    assert list(_state_tensors(nn.Sequential(nn.Linear(2, 3), child))) == ["0.weight", "0.bias"]


@pytest.mark.parametrize("module", [nn.Linear(3, 2), nn.BatchNorm2d(4), _Tied(),
                                    nn.MultiheadAttention(4, 2)])
def test_module_tensors_are_named_parameters_and_buffers(module: nn.Module) -> None:
    want = [(n, t) for n, t in [*module.named_parameters(remove_duplicate=False),
                                *module.named_buffers(remove_duplicate=False)] if t is not None]
    got = _named_tensors(module)
    assert [n for n, _ in got] == [n for n, _ in want]
    assert all(a is b for (_, a), (_, b) in zip(got, want))


def test_handle_axes() -> None:
    h = TensorHandle(3, (2, 5, 7), torch.float32)
    assert h.ndim == 3 and h[0] == AxisRef(3, 0) and h[-1] == AxisRef(3, 2) and h[1] is h[-2]
    assert h.axes() == [AxisRef(3, d) for d in range(3)]
    with pytest.raises(IndexError, match="axis 3 out of range"):
        h[3]
    with pytest.raises(IndexError, match="axis -4 out of range"):
        h[-4]


def _state(t: AtomTable) -> tuple[Any, ...]:
    return (t._parent, t._fixed, t._refined, t._fixed_from, t._also, t.links,
            [t.resolve(Atom(i)) for i in range(len(t._parent))])


def test_atom_unify_shortcut_is_the_general_unify() -> None:
    """Random unions and fixes of atoms (sizes 1-3, some refined into products, some fixed as
    inputs): :meth:`AtomTable.unify` (with its atom-atom shortcut) and the general
    :meth:`AtomTable._unify` leave identical tables."""
    rng = random.Random(0)
    for trial in range(200):
        fast, slow = AtomTable(), AtomTable()
        sizes = [rng.choice((1, 2, 2, 3, 4)) for _ in range(8)]
        for t in (fast, slow):
            for s in sizes:
                t.new(s)
        for step in range(12):
            i, j = rng.randrange(8), rng.randrange(8)
            kind = rng.random()
            why = Reason("input" if kind < 0.2 else "rule", f"n{step}", "op", f"d{step}")
            if kind < 0.35:
                for t in (fast, slow):
                    t.fix(Atom(i), why)
                continue
            if sizes[i] != sizes[j]:
                continue
            if kind > 0.9 and sizes[i] == 4:  # refine through a product
                for t in (fast, slow):
                    t.unify(Atom(i), Prod((t.new(2), t.new(2))), why)
                continue
            fast.unify(Atom(i), Atom(j), why)
            slow._rows = []
            try:
                slow._unify(Atom(i), Atom(j), why)
            finally:
                slow._rows = None
            assert _state(fast) == _state(slow), (trial, step)


def test_axis_classes_are_related_axes_for_single_axes() -> None:
    """Random Same relations between single axes and rule-local atoms: each axis's class (less
    itself and the local atoms) is what :func:`related_axes` relates it to; a product side
    gives None."""
    from fxfuse.groups.roles import axis_classes, related_axes
    from fxfuse.rules import Free, NewAxis, Same

    rng = random.Random(1)
    for _ in range(300):
        exprs: list[Any] = [AxisRef(rng.randrange(4), rng.randrange(3)) for _ in range(6)]
        exprs += [NewAxis(f"k{i}", 2) for i in range(2)]
        rels: list[Any] = [Same(rng.choice(exprs), rng.choice(exprs))
                           for _ in range(rng.randrange(1, 8))]
        rels.append(Free(exprs[0]))
        classes = axis_classes(rels)
        assert classes is not None
        near = related_axes(rels)
        refs = {(e.tensor, e.axis) for e in exprs if isinstance(e, AxisRef)}
        for ref in refs:
            got = {u for u in classes.get(ref, ()) if u != ref and u[0] != "new"}
            assert got == near.get(ref, set()), (rels, ref)
    assert axis_classes([Same(Prod((AxisRef(0, 0), AxisRef(0, 1))), AxisRef(1, 0))]) is None


def test_an_axis_is_one_integer() -> None:
    h = TensorHandle(0, (2, 3, 4), torch.float32)
    assert h[-1] == h[2] == AxisRef(0, 2)
    for bad in (slice(1, None), 1.0):
        with pytest.raises(TypeError):
            h[bad]  # type: ignore[index]


def test_roles_do_not_depend_on_string_hashing() -> None:
    # a weight computed from two parameters (weight_norm) gives axes made of several keys
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import hashlib, torch, fxfuse\n"
            "from torch import nn\n"
            "from torch.nn.utils.parametrizations import weight_norm\n"
            "torch.manual_seed(0)\n"
            "m = nn.Sequential(weight_norm(nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 2))\n"
            "s = fxfuse.find_groups(m, torch.randn(4, 6))\n"
            "print(hashlib.sha1(s.to_json().encode()).hexdigest())")
    root = Path(__file__).resolve().parents[1]
    outs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONHASHSEED": seed},
                           check=True).stdout.split()[-1] for seed in ("0", "4", "11")}
    assert len(outs) == 1, outs
