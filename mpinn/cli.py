"""Command line: argument parsing only; every command calls into the library.

Run any command under ``mpirun -n N``; every rank parses the same arguments. Errors print
one line on rank 0 (``--debug`` adds the traceback) and exit with status 1 on every rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from mpinn.errors import MpinnError

EXIT_ERROR = 1
AGREE_TIMEOUT = 5.0  # seconds a failing rank waits for the others before aborting
REPORT_TIMEOUT = 3.0  # seconds it then waits for rank 0 to report it and abort the job


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpinn", description="Neural networks partitioned across MPI ranks at neuron "
        "granularity. Run any command under mpirun -n N.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML file of settings: top-level keys for every command, [train], "
                        "[predict], ... tables for one; flags on the command line win")
    parser.add_argument("--quiet", action="store_true", help="print only errors and results")
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
    p.add_argument("--force", action="store_true", help="overwrite an existing file")

    p = sub.add_parser("partition", help="store a partition in the model file, or --compare")
    p.add_argument("model")
    p.add_argument("--ranks", type=int)
    p.add_argument("--name", help="partition name (default: the strategy name)")
    p.add_argument("--compare", action="store_true",
                   help="print what every strategy would exchange, its imbalance and local "
                   "edges; store nothing")
    _partition_flags(p, stored=False)

    p = sub.add_parser("inspect", help="print layers, partitions and their traffic")
    p.add_argument("model")

    for name, text in (("train", "train the model in place"),
                       ("evaluate", "print loss and accuracy on a data file"),
                       ("predict", "write the output activations for a data file")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        p.add_argument("--data", help="HDF5 data file with X and y")
        p.add_argument("--batch-size", type=int, default=64 if name == "train" else 256)
        _partition_flags(p)
        if name == "train":
            p.add_argument("--epochs", type=int, default=1)
            p.add_argument("--lr", type=float, default=0.1)
            p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
            p.add_argument("--momentum", type=float, default=0.0)
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
            p.add_argument("--resume", action="store_true",
                           help="continue the stored run until --epochs epochs are complete in all")
        if name == "predict":
            p.add_argument("--out", help="HDF5 file to write 'outputs' to")

    p = sub.add_parser("plot", help="draw PNG pictures (needs matplotlib)")
    p.add_argument("kind", choices=["curves", "partition"],
                   help="curves: from a train --log-json file; partition: traffic and neurons")
    p.add_argument("source", help="the --log-json file, or the model file")
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
    for command in sub.choices.values():  # --quiet also after the command
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="print only errors and results")
    return parser


REQUIRED = {"init": ["sizes"], "partition": ["ranks"], "train": ["data"], "evaluate": ["data"],
            "predict": ["data", "out"]}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line over the settings of ``--config`` (the command line wins)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        settings = _read_config(args.config, args.command)
        known = vars(args)
        unknown = sorted(key for key in settings if key not in known or key in ("command", "config"))
        if unknown:
            raise MpinnError(f"{args.config}: unknown setting(s) for '{args.command}': "
                             f"{', '.join(unknown)}")
        parser.set_defaults(**settings)
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].set_defaults(**settings)
        args = parser.parse_args(argv)
    missing = [f"--{name.replace('_', '-')}" for name in REQUIRED.get(args.command, [])
               if getattr(args, name) is None]
    if missing:
        raise MpinnError(f"{args.command} needs {' and '.join(missing)} (on the command line or "
                         "in --config)")
    return args


def _read_config(path: str, command: str) -> dict[str, object]:
    import tomllib
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise MpinnError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MpinnError(f"--config: {path} is not valid TOML: {exc}") from None
    commands = set(REQUIRED) | {"inspect", "data"}
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


def _choice(args: argparse.Namespace):  # -> PartitionChoice
    from mpinn import distributor
    from mpinn.train import PartitionChoice
    params = distributor.params_from_flags(args.strategy, args.counts, args.percentages,
                                           args.ids, args.layer_ranks)
    return PartitionChoice(getattr(args, "partition", None), args.strategy, params)


def _plot(args: argparse.Namespace) -> None:
    """``mpinn plot``: one process draws; the pictures need no communication."""
    from mpi4py import MPI

    from mpinn import format as fmt
    from mpinn import plot
    from mpinn.describe import rank_traffic
    from mpinn.metadata import MetadataTable
    from mpinn.train import resolve_owner

    out = args.out or os.path.splitext(args.source)[0] + ".png"
    if args.kind == "curves":
        plot.training_curves(args.source, out)
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
    from mpinn.exchange import on_root

    model, data = args.model, args.data
    if (model is None) != (data is None):
        raise MpinnError("bench sparse-dnn: give both --model and --data, or neither")
    if model is None:
        model, data = bench.default_paths(args.dir, args.neurons, args.layers, args.samples, args.seed)

        def make() -> float | None:
            if os.path.exists(model) and os.path.exists(data):
                return None
            os.makedirs(args.dir, exist_ok=True)
            return bench.make_challenge(model, data, args.neurons, args.layers, args.samples,
                                        args.seed)

        baseline = on_root(comm, make)
        if comm.rank == 0 and not (args.quiet or args.json):
            made = "generated" if baseline is not None else "reused"
            print(f"{model}: {made}" + (f"; single-process scipy loop {baseline:.3f} s" if baseline
                                        else ""), flush=True)
    if args.batch_size < 1:
        raise MpinnError(f"--batch-size must be at least 1, got {args.batch_size}")
    batch = args.batch_size
    result = bench.run_challenge(model, data, comm, _choice(args), batch, args.drop_dead)
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
        torch_io.from_torch(torch_io.load_torch_file(args.source), args.model, args.dtype)
        written = args.model
    else:
        from mpinn import torch_io
        torch_io.save_torch_file(torch_io.to_torch(args.model), args.out)
        written = args.out
    if not args.quiet:
        print(f"{written}: written")


def run(args: argparse.Namespace) -> int:
    """Carry out one parsed command on this rank."""
    from mpi4py import MPI

    from mpinn import format as fmt
    from mpinn import train as loop
    from mpinn.data import load, synthetic_classification, synthetic_regression

    comm = MPI.COMM_WORLD
    rank0 = comm.rank == 0
    if args.command == "init":
        sizes = _ints(args.sizes, "--sizes")
        args.sizes = ",".join(map(str, sizes))
        if os.path.exists(args.model) and not args.force:
            raise MpinnError(f"{args.model} exists; pass --force to overwrite it")
        activations = [args.activation] * (len(sizes) - 2) + [args.output]
        storages = [v.strip() for v in args.storage.split(",")] if isinstance(args.storage, str) \
            else list(args.storage)
        sparse = fmt.SparseInit(args.fan_in, args.density)
        if "csr" not in storages and (args.fan_in is not None or args.density is not None):
            raise MpinnError("--fan-in and --density apply to --storage csr layers only")
        fmt.create_model(args.model, sizes, activations, args.dtype, args.seed, comm,
                         storages, sparse, args.cap)
        if rank0 and not args.quiet:
            print(f"{args.model}: {len(sizes) - 1} layers, sizes {args.sizes}, {args.dtype}")
        return 0
    if args.command == "partition":
        from mpinn.describe import compare, store_partition
        choice = _choice(args)
        if args.compare:
            text = compare(args.model, args.ranks, comm, choice.params)
            if rank0:
                print(text)
            return 0
        store_partition(args.model, args.ranks, choice.strategy, choice.params,
                        args.name or choice.strategy, comm)
        return 0
    if args.command == "inspect":
        from mpinn.describe import describe
        text = describe(args.model, comm)
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
        if rank0:  # one process converts; the others wait for it
            _convert(args)
        comm.Barrier()
        return 0
    if args.command == "data":
        make = synthetic_classification if args.kind == "classification" else synthetic_regression
        if rank0:
            x, y = make(args.samples, args.features, args.outputs, args.seed, args.dtype)
            fmt.write_data(args.out, x, y)
            if not args.quiet:
                print(f"{args.out}: {args.samples} samples, {args.features} features")
        return 0

    choice = _choice(args)
    with loop.DistributedModel(args.model, comm, choice, args.batch_size,
                               training=args.command == "train") as model:
        data = load(args.data, model.table, model.spec.dtype, comm)
        if args.command == "train":
            if rank0 and not args.quiet:
                print(f"training {args.model} on {comm.size} ranks ({model.partition_text}), "
                      f"{data.n_samples} samples", flush=True)
            result = loop.train(
                model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                optimizer_name=args.optimizer, momentum=args.momentum, seed=args.seed,
                shuffle=not args.no_shuffle, checkpoint_every=args.checkpoint_every,
                keep=args.keep, resume=args.resume, micro_batches=args.micro_batches,
                progress=rank0 and not args.quiet and (args.progress or sys.stderr.isatty()),
                report=loop.epoch_reporter(args.quiet, args.log_json) if rank0 else None)
            if rank0 and result.stopped_by:
                print(f"mpinn: stopped by {result.stopped_by}: checkpoint committed at epoch "
                      f"{result.epoch}, batch {result.batch}; continue with --resume", flush=True)
        elif args.command == "evaluate":
            loss, accuracy = loop.evaluate(model, data, args.batch_size)
            if rank0:
                acc = f"  accuracy {accuracy:.4f}" if accuracy is not None else ""
                print(f"loss {loss:.6f}{acc}  samples {data.n_samples}")
        else:
            outputs = loop.predict(model, data, args.batch_size)
            fmt.write_outputs(args.out, data.n_samples, model.spec.sizes[-1],
                              model.shard.layers[-1].rows, outputs, comm)
            if rank0 and not args.quiet:
                print(f"{args.out}: outputs of {data.n_samples} samples")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(argv)
    except MpinnError as exc:  # the same on every rank, before any communication
        if os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")) == "0":
            print(f"mpinn: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    if args.threads is not None:
        if args.threads < 1:
            print("mpinn: error: --threads must be at least 1", file=sys.stderr)
            return EXIT_ERROR
        # before numpy loads the BLAS: its pool is sized from these at load time (the
        # automatic value of mpinn/__init__ would cap it), and threadpoolctl can only limit
        # libraries that are already loaded
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)
        import numpy  # noqa: F401
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    from mpi4py import MPI

    from mpinn.exchange import FailureChannel, combine_errors

    comm = MPI.COMM_WORLD
    channel = FailureChannel(comm)
    try:
        return run(args)
    except Exception as exc:
        user_error = isinstance(exc, MpinnError)
        agreed = user_error and exc.agreed  # every rank raised this same error already
        message = str(exc) if user_error else f"internal error: {type(exc).__name__}: {exc}"
        if args.debug or not user_error:
            traceback.print_exc()
        failed = [(0, message)] if agreed else channel.gather_failures(message, AGREE_TIMEOUT)
        if failed is None:
            # the other ranks are elsewhere, possibly inside a collective: end the job
            channel.report_alone(message, REPORT_TIMEOUT)
        if comm.rank == 0:
            text = message if agreed else combine_errors(failed, comm.size)
            print(f"mpinn: error: {text}", file=sys.stderr, flush=True)
        if not agreed and comm.size > 1:
            # ranks may hold files whose collective close would not match: leave without it
            sys.stdout.flush()
            os._exit(EXIT_ERROR)
        return EXIT_ERROR
    finally:
        channel.close()
