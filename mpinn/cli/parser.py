"""Command line: the parser of every command and its flags (training flags from config.TrainConfig).

Run any command under ``mpirun -n N``; every rank parses the same arguments. Errors print
one line on rank 0 (``--debug`` adds the traceback) and exit with status 1 on every rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any, NoReturn

from mpinn.config import (
    ACTIVATIONS,
    AT_LEAST,
    CONTINUED,
    EXCHANGES,
    FLOAT_RANGES,
    MAX_SEED,
    NOT_RUN,
    REGULARISATION,
    option_of,
    training_fields,
)
from mpinn.errors import MpinnError


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are MpinnErrors: one ``mpinn: error:`` line, never a usage
    dump, and the same failure path as every other error (so it is printed under mpirun)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        raise MpinnError(f"{where}{message} (see mpinn {command + ' ' if command else ''}--help)")


def replicas_value(text: str) -> int | str:
    """``--replicas``: a whole number (checked >= 1 with the other ranges) or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number or auto, not {text!r}") from None


def _partition_flags(p: argparse.ArgumentParser, stored: bool = True) -> None:
    g = p.add_argument_group("partition")
    if stored:
        g.add_argument("--partition", metavar="NAME", help="use a partition stored in the model file")
    g.add_argument("--strategy", default="balanced",
                   help="balanced (default), count, percentage, ids, layers, nnz (contiguous, "
                   "balanced by stored weights) or mincut (METIS graph partition; needs pymetis)")
    g.add_argument("--counts", metavar="C0,C1,...", help="neurons per rank (strategy count)")
    g.add_argument("--percentages", metavar="P0,P1,...",
                   help="percent of all neurons per rank (strategy percentage)")
    g.add_argument("--ids", metavar="FILE", help="JSON {rank: [gid or [start, stop)]} (strategy ids)")
    g.add_argument("--layer-ranks", metavar="R0,R1,...",
                   help="owning rank of each layer, inputs first (strategy layers)")


NODES_HELP = ("show bytes between nodes with K consecutive ranks per node (default: this "
              "job's own nodes, when it has the partition's rank count)")


def _exchange_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exchange", default="auto", choices=EXCHANGES,
                   help="how layers exchange activations: auto (the default: allgather for "
                   "layers every rank reads whole at 3 ranks or more, alltoallv otherwise), "
                   "alltoallv, allgather "
                   "(allgather forward, alltoallv backward), collective (allgather forward, "
                   "reduce-scatter backward), both where every rank reads the layer whole, "
                   "neighbor (MPI neighbourhood alltoallv), node (two-level: each value "
                   "crosses between two nodes once, then is forwarded inside the node; "
                   "backward summed inside the node first) or node-forward (node's forward, "
                   "alltoallv's backward); the same results whichever runs "
                   "(docs/scaling.md, 'Exchange kinds')")


# the run settings' help: left out, a training continues with the model's stored value


def _train_flags(p: argparse.ArgumentParser) -> None:
    """``mpinn train``'s options, one flag per field of ``config.TrainConfig`` (where its
    Python name and its flag differ: ``--no-shuffle``); run settings default to None, taken
    from the model's last run (``train.resolve_run``)."""
    kinds = {"whole": int, "number": float, "path": str}
    regularisation = p.add_argument_group(REGULARISATION)
    regularisation.add_argument(
        "--val-data", metavar="FILE",
        help="data file evaluated after every epoch (val_loss, val_accuracy)")
    for f in training_fields():
        meta = f.metadata
        if not meta["cli"]:
            continue
        option = option_of(f)
        where = regularisation if meta["group"] else p
        text = meta["help"]
        if meta["run"] not in (NOT_RUN, None):
            text += CONTINUED.format(meta["run"])
        if option.kind == "bool":
            where.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"),
                               action="store_true", help=text)
            continue
        extra: dict[str, Any] = ({"choices": list(option.choices)} if option.kind == "choice"
                                 else {"type": kinds[option.kind]})
        where.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                           metavar=meta["metavar"], help=text, **extra)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mpinn", description="Neural networks partitioned across MPI ranks at neuron "
        "granularity. Run any command under mpirun -n N.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file of settings: top-level keys for every command, [train], "
                        "[predict], ... tables for one; flags on the command line win")
    parser.add_argument("--quiet", action="store_true", help="print only errors and results")
    parser.add_argument("--collective-timeout", type=float, metavar="SECONDS",
                        help="end the job, naming the ranks, when a rank waits this long for "
                        "the others at a collective step (default: MPINN_COLLECTIVE_TIMEOUT, "
                        "else 600)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="BLAS threads per rank (default: cores / ranks on the node, or "
                        "OMP_NUM_THREADS)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a new model file")
    p.add_argument("model")
    p.add_argument("--sizes", metavar="N0,N1,...,NL",
                   help="neurons per layer, inputs first")
    hidden = ", ".join(a for a in ACTIVATIONS if a != "softmax")
    p.add_argument("--activation", default="relu",
                   help=f"hidden-layer activation: {hidden} (default relu)")
    p.add_argument("--output", default="softmax",
                   help=f"output activation: softmax (the default: classification, cross-entropy "
                   f"on integer labels), identity (regression: squared error on float targets) "
                   f"or any hidden one: {hidden}")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--storage", default="dense", metavar="S[,S...]",
                   help="dense (default) or csr, for all layers or one per layer")
    p.add_argument("--fan-in", type=int, metavar="K", help="csr layers: K random inputs per neuron")
    p.add_argument("--density", type=float, metavar="D",
                   help="csr layers: each connection present with probability D")
    p.add_argument("--cap", type=float, help="ceiling of the relu_cap activation")
    p.add_argument("--negative-slope", type=float, default=0.01,
                   help="leaky_relu's slope below zero (default 0.01)")
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="dropout rate of the hidden layers, stored in the file: train uses it "
                   "unless given its own --dropout (default 0)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing file (not one that another job is writing)")

    p = sub.add_parser("partition", help="store a partition in the model file, or --compare")
    p.add_argument("model")
    p.add_argument("--ranks", type=int)
    p.add_argument("--name", help="partition name (default: the strategy name)")
    p.add_argument("--compare", action="store_true",
                   help="print what every strategy would exchange, its imbalance and local "
                   "edges; store nothing")
    p.add_argument("--plan", action="store_true",
                   help="probe this job's ranks for a few seconds and print the predicted step "
                   "time of every layout (replicas x ranks per group, strategy, micro-batches) "
                   "next to the chosen one; store nothing")
    p.add_argument("--batch-size", type=int, default=256, help="global batch for --plan")
    _partition_flags(p, stored=False)
    p.add_argument("--ranks-per-node", type=int, metavar="K",
                   help=NODES_HELP + "; mincut also places "
                   "its parts so that those exchanging the most share a node")

    p = sub.add_parser("inspect", help="print layers, partitions and their traffic")
    p.add_argument("model")
    p.add_argument("--ranks-per-node", type=int, metavar="K", help=NODES_HELP)

    for name, text in (("train", "train the model in place"),
                       ("evaluate", "print loss and accuracy on a data file"),
                       ("predict", "write the output activations for a data file")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        p.add_argument("--data", help="HDF5 data file with X and y")
        p.add_argument("--batch-size", type=int, default=64 if name == "train" else 256)
        _partition_flags(p)
        p.add_argument("--replicas", type=replicas_value, default=1, metavar="R|auto",
                       help="R copies of the model over R groups of P/R contiguous ranks (data "
                       "x neuron parallelism): each group takes a share of every batch; the "
                       "partition is made for P/R ranks; auto: the layout the cost model "
                       "predicts fastest, printed with its candidates (docs/scaling.md)")
        _exchange_flag(p)
        if name == "train":
            _train_flags(p)
        if name == "predict":
            p.add_argument("--out", help="HDF5 file to write 'outputs' to")

    p = sub.add_parser("plot", help="draw PNG pictures (needs matplotlib)")
    p.add_argument("kind", choices=["curves", "partition", "timeline"],
                   help="curves: from a train --log-json file; partition: traffic and neurons; "
                   "timeline: one step of every rank from a train --trace file")
    p.add_argument("source", help="the --log-json file, the model file, or the --trace file")
    p.add_argument("--out", help="PNG file to write (default: SOURCE with .png)")
    p.add_argument("--partition", metavar="NAME", help="a stored partition (kind partition)")
    p.add_argument("--ranks", type=int, help="rank count for --strategy (kind partition)")
    p.add_argument("--strategy", default="balanced")
    p.add_argument("--counts")
    p.add_argument("--percentages")
    p.add_argument("--ids")
    p.add_argument("--layer-ranks")

    p = sub.add_parser("bench", help="benchmarks run by mpinn itself (sparse-dnn: the Graph "
                       "Challenge's Sparse DNN inference)")
    p.add_argument("kind", choices=["sparse-dnn"])
    p.add_argument("--neurons", type=int, default=1024, help="neurons per layer (default 1024)")
    p.add_argument("--layers", type=int, default=120, help="layers (default 120)")
    p.add_argument("--samples", type=int, default=2000, help="input samples (default 2000)")
    p.add_argument("--batch-size", type=int, default=250,
                   help="samples per pass (default 250: a batch's activations stay in cache)")
    p.add_argument("--seed", type=int, default=0, help="RadiX-Net relabelling and input seed")
    p.add_argument("--dir", default=".", help="where the generated network is kept and reused")
    p.add_argument("--model", help="an existing challenge model (instead of generating one)")
    p.add_argument("--data", help="its inputs, with their categories")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--drop-dead", action="store_true",
                   help="drop samples whose activations died out (ranks agree each layer), as "
                   "the challenge's sparse reference does; default: every sample, every layer")
    p.add_argument("--trace", metavar="FILE",
                   help="write the inference's timeline to FILE: one Chrome trace of every "
                   "rank's compute, pack and wait spans per layer and batch (as train --trace)")
    _partition_flags(p)
    _exchange_flag(p)

    p = sub.add_parser("import-graphchallenge",
                       help="convert the Sparse DNN Challenge's TSV files to a model and inputs")
    p.add_argument("layer_files", nargs="+", metavar="LAYER.tsv",
                   help="one file per layer in order, e.g. neuron1024/n1024-l{1..120}.tsv")
    p.add_argument("--neurons", type=int, required=True)
    p.add_argument("--inputs", required=True, help="e.g. sparse-images-1024.tsv")
    p.add_argument("--categories", help="truth, e.g. neuron1024-l120-categories.tsv (default: "
                   "computed by a single-process run)")
    p.add_argument("--samples", type=int, help="samples in the inputs file (default: the largest row)")
    p.add_argument("--model", required=True, help="model file to write")
    p.add_argument("--data", required=True, help="inputs file to write")

    p = sub.add_parser("import-torch", help="convert a PyTorch Sequential (.pt from "
                       "mpinn.io.pytorch.save_torch_file) to a model file")
    p.add_argument("source", metavar="MODEL.pt")
    p.add_argument("model", metavar="OUT.h5")
    p.add_argument("--dtype", choices=["float32", "float64"])
    p.add_argument("--activation", help="hidden activation, for a plain state_dict (.pt of "
                   "torch.save(model.state_dict()))")
    p.add_argument("--output", help="output activation, for a plain state_dict or after a "
                   "final Linear (softmax: a classifier that ends in logits)")
    p = sub.add_parser("export-torch", help="convert a model file to a PyTorch Sequential (.pt)")
    p.add_argument("model", metavar="MODEL.h5")
    p.add_argument("out", metavar="OUT.pt")

    p = sub.add_parser("data", help="make data files")
    p.add_argument("kind", choices=["classification", "regression"])
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--outputs", type=int, default=10, help="classes or regression targets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    for name, command in sub.choices.items():  # --quiet also after the command
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="print only errors and results")
        if name in FORCE_HELP:
            command.add_argument("--force", action="store_true", help=FORCE_HELP[name])
    return parser


FORCE_HELP = {
    "partition": "replace a stored partition of the same name",
    "train": "with --keep-best: replace a MODEL.best.h5 that this model's training did not "
             "write; with --trace: replace an existing trace file",
    "predict": "overwrite an existing --out file (never the model or the data)",
    "plot": "overwrite an existing --out file (never the source)",
    "import-graphchallenge": "overwrite existing --model and --data files (never an input)",
    "import-torch": "overwrite an existing OUT.h5",
    "export-torch": "overwrite an existing OUT.pt",
    "data": "overwrite an existing OUT file",
}


REQUIRED = {"init": ["sizes"], "partition": ["ranks"], "train": ["data"], "evaluate": ["data"],
            "predict": ["data", "out"]}
LIST_FLAGS = {"sizes", "storage", "counts", "percentages", "layer_ranks"}  # "a,b,c" or a TOML list


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line over the settings of ``--config`` (the command line wins) and
    check every value's type, range and combination: before any file is opened or written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        settings = _read_config(args.config, args.command)
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command = subparsers.choices[args.command]
        actions = {a.dest: a for p in (parser, command) for a in p._actions
                   if a.option_strings and a.dest not in ("help", "config")}
        unknown = sorted(key for key in settings if key not in actions)
        if unknown:
            raise MpinnError(f"{args.config}: unknown setting(s) for '{args.command}': "
                             f"{', '.join(k.replace('_', '-') for k in unknown)}")
        for key, value in settings.items():
            settings[key] = _setting(args.config, key, value, actions[key])
        parser.set_defaults(**settings)
        command.set_defaults(**settings)
        args = parser.parse_args(argv)
    if args.threads is not None and args.threads >= 1:
        # before numpy loads the BLAS (check_values imports it): its pool is sized from these
        # at load time (the automatic value of mpinn/__init__ would cap it), and
        # threadpoolctl can only limit libraries that are already loaded
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)
    missing = [f"--{name.replace('_', '-')}" for name in REQUIRED.get(args.command, [])
               if getattr(args, name) is None]
    if missing:
        raise MpinnError(f"{args.command} needs {' and '.join(missing)} (on the command line or "
                         "in --config)")
    check_values(args)
    if args.collective_timeout is not None:  # read by mpinn.comm.watchdog at each collective call
        os.environ["MPINN_COLLECTIVE_TIMEOUT"] = repr(args.collective_timeout)
    return args


def _setting(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """A config value checked against the type of its flag (a TOML ``true`` is no epoch count,
    and ``"false"`` is no boolean)."""
    flag = action.option_strings[-1]
    where = f"{path}: {key.replace('_', '-')} = {_toml(value)}"
    scalar = (str, int, float)
    if isinstance(action, argparse._StoreTrueAction):
        ok, kind = isinstance(value, bool), "true or false"
    elif action.type is int:
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif action.type is replicas_value:
        ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool))
        kind = "a whole number or \"auto\""
    elif action.type is float:
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif key in LIST_FLAGS:
        ok = isinstance(value, str) or (isinstance(value, list) and all(
            isinstance(v, scalar) and not isinstance(v, bool) for v in value))
        kind = "text like \"a,b,c\" or a list of numbers or names"
    else:
        ok, kind = isinstance(value, str), "text"
    if not ok:
        raise MpinnError(f"{where}: {flag} takes {kind}, not {type(value).__name__}")
    if action.choices is not None and value not in action.choices:
        raise MpinnError(f"{where}: {flag} must be one of {', '.join(map(str, action.choices))}")
    return value


def _toml(value: Any) -> str:
    """A config value as it was written in TOML, for messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def check_values(args: argparse.Namespace) -> None:
    """Ranges and combinations of the parsed settings: every mistake a flag alone can show is
    refused here, before any work (a training never runs to its end to refuse ``--keep 0``)."""
    from mpinn.partition.strategies import STRATEGIES

    values = vars(args)
    for key, least in AT_LEAST.items():
        value = values.get(key)
        if isinstance(value, (int, float)) and value < least:  # not --replicas auto
            raise MpinnError(f"--{key.replace('_', '-')} must be at least {least}, got {value}")
    if values.get("seed") is not None and values["seed"] > MAX_SEED:
        raise MpinnError(f"--seed must be at most {MAX_SEED}, got {values['seed']}")
    for key, (inside, wanted) in FLOAT_RANGES.items():
        value = values.get(key)
        if value is not None and not (math.isfinite(value) and inside(value)):
            raise MpinnError(f"--{key.replace('_', '-')} must be {wanted}, got {value}")
    strategy = values.get("strategy")
    if strategy is not None:
        if strategy not in STRATEGIES:
            raise MpinnError(f"--strategy {strategy!r} is unknown (known: {', '.join(STRATEGIES)})")
        for key, wants in (("counts", "count"), ("percentages", "percentage"), ("ids", "ids"),
                           ("layer_ranks", "layers")):
            if values.get(key) is not None and strategy != wants:
                raise MpinnError(f"--{key.replace('_', '-')} applies to --strategy {wants}, "
                                 f"not {strategy}")
        if values.get("partition") is not None and strategy != "balanced":
            raise MpinnError("give --partition (a stored partition) or --strategy, not both")
    if args.command == "train" and (args.patience or args.keep_best) and not args.val_data:
        raise MpinnError("--patience and --keep-best watch the validation loss: give --val-data")
    if args.command == "train" and args.micro_batches > args.batch_size:
        raise MpinnError(f"--micro-batches {args.micro_batches} exceeds --batch-size "
                         f"{args.batch_size}: every micro-batch needs a sample")
    if args.command == "init":
        args.sizes = _ints(args.sizes, "--sizes")
        if len(args.sizes) < 2 or min(args.sizes) < 1:
            raise MpinnError(f"--sizes needs at least two layers of at least 1 neuron, got "
                             f"{','.join(map(str, args.sizes))}")
        storages = args.storage.split(",") if isinstance(args.storage, str) else args.storage
        args.storage = [str(v).strip() for v in storages]
        if "csr" not in args.storage and (args.fan_in is not None or args.density is not None):
            raise MpinnError("--fan-in and --density apply to --storage csr layers only")
    if args.command == "partition" and args.name is not None and (
            not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.name) or args.name in (".", "..")):
        raise MpinnError(f"--name {args.name!r}: a partition name is letters, digits and "
                         "'_', '.', '+', '-' (not '.' or '..')")
    if args.command == "plot" and args.kind == "partition" and args.partition is None \
            and args.ranks is None:
        raise MpinnError("plot partition needs --partition NAME (a stored partition) or --ranks N "
                         "(the ranks to compute --strategy for)")
    if args.command == "bench" and (args.model is None) != (args.data is None):
        raise MpinnError("bench sparse-dnn: give both --model and --data, or neither")


def _read_config(path: str, command: str) -> dict[str, Any]:
    import tomllib
    if os.path.isdir(path):
        raise MpinnError(f"--config: {path} is a directory")
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise MpinnError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MpinnError(f"--config: {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise MpinnError(f"--config: {path} nests too deeply") from None
    commands = set(REQUIRED) | {"inspect", "data", "plot", "bench", "import-graphchallenge",
                                "import-torch", "export-torch"}
    settings = {k: v for k, v in table.items() if not (isinstance(v, dict) and k in commands)}
    section = table.get(command, {})
    if not isinstance(section, dict):
        raise MpinnError(f"--config: [{command}] in {path} must be a table")
    settings.update(section)
    return {key.replace("-", "_"): value for key, value in settings.items()}


def _ints(text: str | list, flag: str) -> list[int]:
    try:
        return [int(v) for v in (text if isinstance(text, list) else text.split(","))]
    except ValueError:
        raise MpinnError(f"{flag}: cannot read {text!r} as comma-separated integers") from None
