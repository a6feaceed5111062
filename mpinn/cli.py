"""Command line: argument parsing only; every command calls into the library.

Run any command under ``mpirun -n N``; every rank parses the same arguments. Errors print
one line on rank 0 (``--debug`` adds the traceback) and exit with status 1 on every rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from mpinn.errors import Interrupted, MpinnError
from mpinn.options import AT_LEAST, FLOAT_RANGES, MAX_SEED

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_BROKEN_PIPE = 128 + 13  # a closed stdout: the status of a process ended by SIGPIPE
AGREE_TIMEOUT = 5.0  # seconds a failing rank waits for the others before aborting
REPORT_TIMEOUT = 3.0  # seconds it then waits for rank 0 to report it and abort the job


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


# exchange.EXCHANGES, spelled out here so that parsing the flags does not start MPI
EXCHANGES = ("auto", "alltoallv", "allgather", "collective", "neighbor", "node",
             "node-forward")


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
CONTINUED = " (default: the value the model's last run used, else %s)"


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
    p.add_argument("--activation", default="relu", help="hidden-layer activation (default relu)")
    p.add_argument("--output", default="softmax", help="output activation (default softmax)")
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
            p.add_argument("--epochs", type=int, default=1)
            p.add_argument("--lr", type=float, help="learning rate" + CONTINUED % 0.1)
            p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"],
                           help="adamw: Adam with decoupled weight decay (torch AdamW)"
                           + CONTINUED % "sgd")
            p.add_argument("--reset-optimizer", action="store_true",
                           help="start the optimizer afresh: drop the state (Adam's moments, "
                           "momentum) the model holds, and take the optimizer's settings from "
                           "the flags and defaults, not the model; needed to change --optimizer")
            p.add_argument("--momentum", type=float, help="SGD momentum" + CONTINUED % 0)
            p.add_argument("--seed", type=int, default=0, help="shuffling seed")
            p.add_argument("--no-shuffle", action="store_true")
            p.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                           help="also save every K epochs (default: only at the end)")
            p.add_argument("--keep", type=int, default=1, metavar="K",
                           help="checkpoints to keep: the model file and K-1 older ones in "
                           "MODEL.checkpoints/ (default 1)")
            p.add_argument("--micro-batches", type=int, default=1, metavar="M",
                           help="run each batch as a pipeline of M micro-batches (GPipe); pays "
                           "off when ranks own whole layers (--strategy layers)")
            p.add_argument("--progress", action="store_true",
                           help="show a progress bar even when stderr is not a terminal (under "
                           "mpirun the ranks' stderr never is)")
            p.add_argument("--log-json", metavar="FILE",
                           help="append one JSON object per epoch to FILE (rank 0)")
            p.add_argument("--trace", metavar="FILE",
                           help="write the run's timeline to FILE: one Chrome trace (open it in "
                           "ui.perfetto.dev or chrome://tracing) of every rank's compute, pack, "
                           "wait, optimizer and checkpoint spans per layer and step, and each "
                           "exchange in flight, clocks aligned (docs/scaling.md)")
            p.add_argument("--resume", action="store_true",
                           help="continue the stored run until --epochs epochs are complete in all "
                                "(none left: says so and exits 0)")
            g = p.add_argument_group("validation, schedules and regularisation (docs/api.md)")
            g.add_argument("--val-data", metavar="FILE",
                           help="data file evaluated after every epoch (val_loss, val_accuracy)")
            g.add_argument("--patience", type=int, default=0, metavar="K",
                           help="stop after K epochs without a lower validation loss (0: never)")
            g.add_argument("--keep-best", action="store_true",
                           help="also commit each new best validation loss to MODEL.best.h5 "
                           "(m.h5 -> m.best.h5)")
            g.add_argument("--schedule", choices=["constant", "step", "cosine"],
                           help="learning rate per step: constant, step (StepLR) or cosine "
                           "(CosineAnnealingLR over all the run's steps)" + CONTINUED % "constant")
            g.add_argument("--step-size", type=int, metavar="E",
                           help="step schedule: multiply the rate by --gamma every E epochs"
                           + CONTINUED % 1)
            g.add_argument("--gamma", type=float, help="step schedule's factor" + CONTINUED % 0.1)
            g.add_argument("--min-lr", type=float,
                           help="cosine schedule's floor" + CONTINUED % 0)
            g.add_argument("--warmup-steps", type=int, metavar="W",
                           help="scale the rate by (t+1)/W over the first W steps" + CONTINUED % 0)
            g.add_argument("--weight-decay", type=float, metavar="WD",
                           help="L2 added to the gradient (sgd, adam); decoupled for adamw"
                           + CONTINUED % 0)
            g.add_argument("--clip-norm", type=float, metavar="C",
                           help="clip the global gradient norm over all ranks to C (0: off)"
                           + CONTINUED % 0)
            g.add_argument("--dropout", type=float, metavar="P",
                           help="inverted dropout on hidden layers while training; the same "
                           "masks at any rank count (default: the last run's --dropout, else "
                           "the rates the model file stores, set by init --dropout or "
                           "import-torch; 0 turns them off)")
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
                       "mpinn.torch_io.save_torch_file) to a model file")
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
    if args.collective_timeout is not None:  # read by mpinn.watchdog at each collective call
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
    from mpinn.distributor import STRATEGIES

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


def _choose_layout(args: argparse.Namespace, comm: Any, rank0: bool) -> None:
    """``--replicas auto``: R (and, for training with the partition left to mpinn, the
    strategy and micro-batches) from the cost model, after a few seconds of probing."""
    from mpinn.describe import choose_layout

    fixed = (args.command != "train" or getattr(args, "partition", None) is not None
             or args.strategy != "balanced" or args.micro_batches > 1)
    chosen, table, layer_ranks = choose_layout(args.model, comm.size, args.batch_size, comm,
                                               pipelines=not fixed,
                                               partition=getattr(args, "partition", None))
    args.replicas = chosen.replicas
    if layer_ranks is not None:
        args.strategy, args.micro_batches = "layers", chosen.micro_batches
        args.layer_ranks = ",".join(map(str, layer_ranks))
    if rank0 and not args.quiet:
        print(f"--replicas auto:\n{table}", flush=True)


def _choice(args: argparse.Namespace):  # -> PartitionChoice
    from mpinn import distributor
    from mpinn.train import PartitionChoice
    params = distributor.params_from_flags(args.strategy, args.counts, args.percentages,
                                           args.ids, args.layer_ranks)
    return PartitionChoice(getattr(args, "partition", None), args.strategy, params)


@dataclass
class FilePlan:
    """What a command reads, what it writes new (checked by ``outputs.check``), and what it
    writes at all, with the action its lock names (``locked``)."""

    inputs: dict[str, str | list[str]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    locked: dict[str, str] = field(default_factory=dict)
    force: bool = False
    appended: dict[str, str] = field(default_factory=dict)  # written to, but never replaced
    # what else must hold before any work (a model it rewrites is writable, ...): run last
    checks: list[Callable[[], None]] = field(default_factory=list)


def plot_out(args: argparse.Namespace) -> str:
    return args.out or os.path.splitext(args.source)[0] + ".png"


def file_plan(args: argparse.Namespace) -> FilePlan:
    """The files of the parsed command, for the checks made before any work."""
    from mpinn import format as fmt
    from mpinn import outputs
    from mpinn.train import check_best

    plan = FilePlan(force=bool(getattr(args, "force", False)))
    if args.config:
        plan.inputs["--config"] = args.config
    if getattr(args, "ids", None):
        plan.inputs["--ids"] = args.ids
    command = args.command

    def writes(flag: str, path: str, action: str) -> None:
        plan.outputs[flag] = path
        plan.locked[path] = action

    if command == "init":
        writes("MODEL", args.model, "written by init")
    elif command in ("partition", "inspect", "train", "evaluate", "predict"):
        plan.inputs["MODEL"] = args.model
        if command == "partition" and not (args.compare or args.plan):
            plan.locked[args.model] = "partitioned"
            plan.checks.append(lambda: outputs.check_writable(
                "MODEL", args.model, "partition would write into it"))
        if command == "train":
            plan.locked[args.model] = "trained"
            plan.checks.append(lambda: outputs.check_writable(
                "MODEL", args.model, "train would replace it"))
            if args.keep > 1:
                plan.checks.append(lambda: fmt.check_history(args.model, args.keep))
            if args.log_json:
                plan.appended["--log-json"] = args.log_json
            if args.trace:
                writes("--trace", args.trace, "written by --trace")
            if args.val_data:
                plan.inputs["--val-data"] = args.val_data
            if args.keep_best:  # the model's own companion, replaced at each new best
                from mpinn.train import best_path
                plan.appended["--keep-best"] = best_path(args.model)
                plan.locked[best_path(args.model)] = "written by --keep-best"
                plan.checks.append(lambda: check_best(args.model, plan.force))
        if command in ("train", "evaluate", "predict"):
            plan.inputs["--data"] = args.data
        if command == "predict":
            writes("--out", args.out, "written by predict")
    elif command == "plot":
        plan.inputs["SOURCE"] = args.source
        writes("--out", plot_out(args), "drawn")
    elif command == "bench":
        if args.model is not None:
            plan.inputs.update({"--model": args.model, "--data": args.data})
        else:
            from mpinn.bench import default_paths
            if os.path.exists(args.dir) and not os.path.isdir(args.dir):
                raise MpinnError(f"--dir {args.dir} is a file, not a directory")
            model, data = default_paths(args.dir, args.neurons, args.layers, args.samples, args.seed)
            if os.path.exists(model) and os.path.exists(data):  # made by an earlier run: reused
                plan.inputs.update({"--dir model": model, "--dir data": data})
            elif os.path.isdir(args.dir):
                plan.force = True  # a half-made pair in --dir is made again
                writes("--dir model", model, "generated")
                writes("--dir data", data, "generated")
    elif command == "import-graphchallenge":
        plan.inputs["LAYER.tsv"] = list(args.layer_files)
        plan.inputs["--inputs"] = args.inputs
        if args.categories:
            plan.inputs["--categories"] = args.categories
        writes("--model", args.model, "written by import-graphchallenge")
        writes("--data", args.data, "written by import-graphchallenge")
    elif command == "import-torch":
        plan.inputs["MODEL.pt"] = args.source
        writes("OUT.h5", args.model, "written by import-torch")
    elif command == "export-torch":
        plan.inputs["MODEL.h5"] = args.model
        writes("OUT.pt", args.out, "written by export-torch")
    elif command == "data":
        writes("OUT", args.out, "written by mpinn data")
    return plan


def check_files(plan: FilePlan) -> None:
    """Inputs exist and are files; outputs follow ``outputs.check``; appended files are no input."""
    from mpinn import outputs

    for flag, paths in plan.inputs.items():
        for path in [paths] if isinstance(paths, str) else paths:
            if os.path.isdir(path):
                raise MpinnError(f"{flag} {path} is a directory, not a file")
            if not os.path.exists(path):
                raise MpinnError(f"{flag} {path}: no such file")
    outputs.check(plan.outputs, plan.inputs, plan.force)
    outputs.check(plan.appended, plan.inputs, force=True)
    for check in plan.checks:
        check()


held_locks: list = []  # rank 0's locks of this command's outputs, released as it ends


def take_locks(plan: FilePlan, comm, quiet: bool) -> None:  # noqa: ANN001 - a communicator
    """Lock every file the command writes (rank 0), or refuse on every rank, naming the holder."""
    from mpinn import lock
    from mpinn.exchange import on_root

    notes = on_root(comm, lambda: lock.take_all(plan.locked, held_locks))
    if comm.rank == 0 and not quiet:  # once, not once per rank
        for note in notes:
            print(note, file=sys.stderr, flush=True)


def release_locks() -> None:
    from mpinn import lock
    lock.release_all(held_locks)


def _plot(args: argparse.Namespace) -> None:
    """``mpinn plot``: one process draws; the pictures need no communication."""
    from mpi4py import MPI

    from mpinn import format as fmt
    from mpinn import plot
    from mpinn.describe import rank_traffic
    from mpinn.metadata import MetadataTable
    from mpinn.train import resolve_owner

    out = plot_out(args)
    if args.kind == "curves":
        plot.training_curves(args.source, out)
    elif args.kind == "timeline":
        plot.timeline(args.source, out)
    else:
        with fmt.opened(args.source, "r", MPI.COMM_SELF) as f:
            spec = fmt.read_spec(f)
            choice = _choice(args)
            nranks = args.ranks or 1
            if choice.name is not None:
                nranks = fmt.read_partition(f, choice.name)[1]
            owner, text = resolve_owner(f, spec, choice, nranks, MPI.COMM_SELF)
            table = MetadataTable.build(spec.sizes, owner, nranks)
            traffic = rank_traffic(spec, table, fmt.wiring_reader(f, spec)).forward_matrix
        plot.partition_picture(table, traffic, f"{args.source}: {text}, {nranks} ranks", out)
    if not args.quiet:
        print(f"{out}: written")


def _bench(args: argparse.Namespace, comm) -> int:  # noqa: ANN001 - an MPI communicator
    """``mpinn bench sparse-dnn``: generate (or reuse) the network, infer on all ranks, check."""
    from mpinn import bench
    from mpinn.exchange import agree

    model, data = args.model, args.data
    if model is None:
        model, data = bench.default_paths(args.dir, args.neurons, args.layers, args.samples, args.seed)

        def make() -> float | None:
            if os.path.exists(model) and os.path.exists(data):
                return None
            os.makedirs(args.dir, exist_ok=True)
            bench.check_room(args.dir, args.neurons, args.layers, args.samples)
            return bench.make_challenge(model, data, args.neurons, args.layers, args.samples,
                                        args.seed, comm=comm)

        baseline = agree(comm, make)  # every rank writes layers and runs a share of the truth
        if comm.rank == 0 and not (args.quiet or args.json):
            made = "generated" if baseline is not None else "reused"
            loop = f"; scipy loop on {comm.size} processes {baseline:.3f} s" if baseline else ""
            print(f"{model}: {made}{loop}", flush=True)
    from mpinn import format as fmt
    batch = min(args.batch_size, agree(comm, lambda: fmt.count_samples(data)))
    result = bench.run_challenge(model, data, comm, _choice(args), batch, args.drop_dead,
                                 args.exchange)
    if comm.rank == 0:
        report = bench.challenge_json if args.json else bench.challenge_report
        print(report(result, comm.size), flush=True)
    return 0 if result.correct else EXIT_ERROR


def _convert(args: argparse.Namespace) -> None:
    """The converters: one process, whole layers (never under the engine)."""
    if args.command == "import-graphchallenge":
        from mpinn import bench
        bench.import_challenge(args.layer_files, args.neurons, args.inputs, args.categories,
                               args.model, args.data, args.samples)
        written = f"{args.model} and {args.data}"
    elif args.command == "import-torch":
        from mpinn import torch_io
        model = torch_io.load_torch_file(args.source, args.activation, args.output)
        if args.output is None and torch_io.ends_in_logits(model):
            print(f"mpinn: note: {args.source} ends in a Linear with no activation (logits): "
                  f"{args.model} gets an identity output, which trains with squared error; for a "
                  "classifier trained with cross-entropy, import it with --output softmax (the "
                  "same classes, trained with cross-entropy)", file=sys.stderr, flush=True)
        torch_io.from_torch(model, args.model, args.dtype)
        written = args.model
    else:
        from mpinn import torch_io
        torch_io.save_torch_file(torch_io.to_torch(args.model), args.out)
        written = args.out
    if not args.quiet:
        print(f"{written}: written")


def run(args: argparse.Namespace) -> int:
    """Carry out one parsed command on this rank: its files checked and locked, then the work."""
    from mpi4py import MPI

    from mpinn import format as fmt
    from mpinn import outputs
    from mpinn import train as loop
    from mpinn.data import load, synthetic_classification, synthetic_regression
    from mpinn.exchange import agree

    comm = MPI.COMM_WORLD
    rank0 = comm.rank == 0

    def plan_and_check() -> FilePlan:
        plan = file_plan(args)
        check_files(plan)
        return plan

    take_locks(agree(comm, plan_and_check), comm, args.quiet)
    if args.command == "init":
        sizes = args.sizes
        activations = [args.activation] * (len(sizes) - 2) + [args.output]
        sparse = fmt.SparseInit(args.fan_in, args.density)
        fmt.create_model(args.model, sizes, activations, args.dtype, args.seed, comm,
                         args.storage, sparse, args.cap, args.negative_slope, args.dropout)
        if rank0 and not args.quiet:
            print(f"{args.model}: {len(sizes) - 1} layers, sizes {','.join(map(str, sizes))}, "
                  f"{args.dtype}")
        return 0
    if args.command == "partition":
        from mpinn.describe import compare, store_partition
        choice = _choice(args)
        if args.compare:
            text = compare(args.model, args.ranks, comm, choice.params, args.ranks_per_node)
            if rank0:
                print(text)
            return 0
        if args.plan:
            from mpinn.describe import plan
            text = plan(args.model, args.ranks, args.batch_size, comm)
            if rank0:
                print(text)
            return 0
        store_partition(args.model, args.ranks, choice.strategy, choice.params,
                        args.name or choice.strategy, comm, args.force, args.ranks_per_node)
        return 0
    if args.command == "inspect":
        from mpinn.describe import describe
        text = describe(args.model, comm, args.ranks_per_node)
        if rank0:
            print(text)
        return 0
    if args.command == "plot":
        if rank0:
            _plot(args)
        return 0
    if args.command == "bench":
        return _bench(args, comm)
    if args.command in ("import-graphchallenge", "import-torch", "export-torch"):
        from mpinn.exchange import on_root
        on_root(comm, lambda: _convert(args))  # one process converts; the others wait for it
        return 0
    if args.command == "data":
        make = synthetic_classification if args.kind == "classification" else synthetic_regression

        def write() -> None:
            values = args.samples * (args.features + args.outputs)
            fmt.check_space(args.out, values * 8, 3 * values * 8,
                            f"a data set of {args.samples:,} samples x {args.features:,} features")
            x, y = make(args.samples, args.features, args.outputs, args.seed, args.dtype)
            fmt.write_data(args.out, x, y)

        from mpinn.exchange import on_root
        on_root(comm, write)
        if rank0 and not args.quiet:
            print(f"{args.out}: {args.samples} samples, {args.features} features")
        return 0

    # a batch is never larger than the data: buffers are sized by it
    args.batch_size = min(args.batch_size, agree(comm, lambda: fmt.count_samples(args.data)))
    if args.command == "train":
        args.micro_batches = min(args.micro_batches, args.batch_size)
    if args.replicas == "auto":
        _choose_layout(args, comm, rank0)
    from mpinn.api import Network
    with Network(args.model, _choice(args), comm, replicas=args.replicas,
                 exchange=args.exchange, locked=True) as net:
        if args.command == "train":
            if rank0 and not args.quiet:
                layout = (f" = {args.replicas} replicas x {comm.size // args.replicas}"
                          if args.replicas > 1 else "")
                print(f"training {args.model} on {comm.size} ranks{layout} ({net.partition_text}), "
                      f"{fmt.count_samples(args.data)} samples", flush=True)
                if args.strategy == "mincut" and args.partition is None:
                    # METIS is run again by every later command: say how to keep this one
                    print(f"mpinn: note: this mincut partition is not stored in {args.model}; "
                          f"store it with mpinn partition {args.model} --ranks "
                          f"{comm.size // args.replicas} --strategy mincut --name NAME and "
                          "use --partition NAME", file=sys.stderr, flush=True)
            history = net.fit(
                args.data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                optimizer=args.optimizer, momentum=args.momentum, seed=args.seed,
                shuffle=not args.no_shuffle, validation_data=args.val_data,
                checkpoint_every=args.checkpoint_every, keep=args.keep, resume=args.resume,
                micro_batches=args.micro_batches, patience=args.patience,
                keep_best=args.keep_best, schedule=args.schedule, step_size=args.step_size,
                gamma=args.gamma, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                weight_decay=args.weight_decay, clip_norm=args.clip_norm, dropout=args.dropout,
                reset_optimizer=args.reset_optimizer,
                progress=not args.quiet and (args.progress or sys.stderr.isatty()),
                log_json=args.log_json, verbose=not args.quiet, force=args.force,
                trace=args.trace)
            if rank0 and history.stopped_by:
                print(f"mpinn: stopped by {history.stopped_by}: checkpoint committed at epoch "
                      f"{history.epoch}, batch {history.batch}; continue with --resume",
                      flush=True)
            if rank0 and args.resume and not history.epochs and not history.stopped_by:
                print(_nothing_to_train(args.model, net.model.state, args.epochs), flush=True)
            if rank0 and history.stopped_early == "patience" and not args.quiet:
                print(f"stopped early: no lower validation loss for {args.patience} epochs "
                      f"(best {history.best_val_loss:.6f})", flush=True)
        elif args.command == "evaluate":
            metrics = net.evaluate(args.data, batch_size=args.batch_size)
            if rank0:
                acc = (f"  accuracy {metrics['accuracy']:.4f}" if metrics["accuracy"] is not None
                       else "")
                print(f"loss {metrics['loss']:.6f}{acc}  samples {fmt.count_samples(args.data)}  "
                      f"model {args.model}  data {args.data}")
        else:  # each rank writes its own output columns: no rank gathers them all
            model = net.model
            data = load(args.data, model.table, model.spec.dtype, comm, model.group)
            values = loop.predict(model, data, args.batch_size)
            columns = model.shard.layers[-1].rows
            if model.groups.index > 0:  # with replicas every group has them: group 0 writes
                columns, values = columns[:0], values[:0]
            with outputs.staged_collective(args.out, comm) as partial:
                fmt.write_outputs(partial, data.n_samples, model.spec.sizes[-1],
                                  columns, values, comm)
            if rank0 and not args.quiet:
                print(f"{args.out}: outputs of {data.n_samples} samples")
    return 0


def _nothing_to_train(model: str, state: dict[str, Any], epochs: int) -> str:
    """The one line of a ``train --resume`` that found nothing left to train. Not an error
    (exit 0): a job that is requeued after its run completed must succeed again."""
    done = int(state.get("epoch", 0))
    if state.get("stopped_early"):
        return (f"mpinn: nothing to train: the run stored in {model} stopped early at epoch "
                f"{done}; --resume trains it no further")
    return (f"mpinn: nothing to train: {model} already has {done} epochs; --resume trains until "
            f"--epochs N are complete in all (--epochs {epochs}): give an --epochs above {done}")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check, lock, run; any error becomes one ``mpinn: error:`` line printed by rank 0
    before any rank exits, and exit status 1 on every rank (130 after Ctrl-C)."""
    args, early = None, None
    try:
        args = parse(argv)
    except MpinnError as exc:  # the same on every rank: reported below, once MPI is up
        early = exc
    if args is not None and args.threads is not None:
        import numpy  # noqa: F401 - loads the BLAS with the thread count parse() set
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    from mpi4py import MPI

    from mpinn.exchange import FailureChannel, combine_errors

    comm = MPI.COMM_WORLD
    channel = FailureChannel(comm, before_abort=release_locks)
    debug = bool(args and args.debug) or "--debug" in (sys.argv if argv is None else argv)
    if not debug:
        import numpy as np
        # a diverging run's overflow and NaN warnings would come before its one error line:
        # every loss is checked for finiteness and reported as that line (--debug shows them)
        np.seterr(all="ignore")
    try:
        if early is not None:
            raise early
        return run(args)
    except KeyboardInterrupt as exc:
        agreed = isinstance(exc, Interrupted)  # every rank stopped at the same step
        message = str(exc) if agreed else ("interrupted; nothing was written over (outputs "
                                           "appear only when complete, a model only at its "
                                           "checkpoints)")
        if not agreed and comm.size > 1 and channel.gather_failures(message, AGREE_TIMEOUT) is None:
            # SIGINT reached only some ranks outside a training step (kill -INT of one rank):
            # the others wait in a collective for this one; have rank 0 print it, release the
            # locks and end the job
            channel.report_alone(message, REPORT_TIMEOUT, EXIT_INTERRUPTED)
        if comm.rank == 0:
            print(f"mpinn: error: {message}", file=sys.stderr, flush=True)
        release_locks()
        if comm.size > 1:
            channel.comm.Barrier()  # no rank exits (and has mpirun end the job) before the line
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # stdout's reader is gone (`mpinn inspect M | head -1`): no message and no traceback,
        # as a Unix tool ended by SIGPIPE, and its exit status, 141, which also ends an mpirun
        # job whose other ranks still run (without MPI's finalize, which would wait for them)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        release_locks()
        if comm.size > 1:
            os._exit(EXIT_BROKEN_PIPE)
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        user_error = isinstance(exc, MpinnError)
        agreed = user_error and exc.agreed  # every rank raised this same error already
        message = str(exc) if user_error else f"internal error: {type(exc).__name__}: {exc}"
        if debug or not user_error:
            traceback.print_exc()
        failed = [(0, message)] if agreed else channel.gather_failures(message, AGREE_TIMEOUT)
        release_locks()
        if failed is None:
            # the other ranks are elsewhere, possibly inside a collective: end the job
            channel.report_alone(message, REPORT_TIMEOUT)
        if comm.rank == 0:
            same = early is not None and all(m == message for _, m in failed or [])
            text = message if agreed or same else combine_errors(failed, comm.size)
            print(f"mpinn: error: {text}", file=sys.stderr, flush=True)
        if comm.size > 1:
            channel.comm.Barrier()  # no rank exits (and has mpirun end the job) before the line
        if not agreed and early is None and comm.size > 1:
            # ranks may hold files whose collective close would not match: leave without it
            sys.stdout.flush()
            os._exit(EXIT_ERROR)
        return EXIT_ERROR
    finally:
        release_locks()
        channel.close()
