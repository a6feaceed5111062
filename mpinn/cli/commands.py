"""One function per command of the CLI, run on every rank after parsing, with
the locks, the agreed errors and the exit codes of a command line."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mpinn.cli.parser import parse
from mpinn.config import training_fields
from mpinn.errors import Interrupted, MpinnError, print_error

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_BROKEN_PIPE = 128 + 13  # a closed stdout: the status of a process ended by SIGPIPE
AGREE_TIMEOUT = 5.0  # seconds a failing rank waits for the others before aborting
REPORT_TIMEOUT = 3.0  # seconds it then waits for rank 0 to report it and abort the job


def _choose_layout(args: argparse.Namespace, comm: Any, rank0: bool) -> None:
    """``--replicas auto``: R (and, for training with the partition left to mpinn, the
    strategy and micro-batches) from the cost model, after a few seconds of probing."""
    from mpinn.tools.inspect import choose_layout

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
    from mpinn.partition import strategies
    from mpinn.partition.choice import PartitionChoice
    params = strategies.params_from_flags(args.strategy, args.counts, args.percentages,
                                           args.ids, args.layer_ranks)
    return PartitionChoice(getattr(args, "partition", None), args.strategy, params)


@dataclass
class CommandFiles:
    """What a command reads, what it writes new (checked by ``io.staging.check``), and what it
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


def command_files(args: argparse.Namespace) -> CommandFiles:
    """The files of the parsed command, for the checks made before any work."""
    from mpinn.io import checkpoint, staging
    from mpinn.train import check_best

    plan = CommandFiles(force=bool(getattr(args, "force", False)))
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
            plan.checks.append(lambda: staging.check_writable(
                "MODEL", args.model, "partition would write into it"))
        if command == "train":
            plan.locked[args.model] = "trained"
            plan.checks.append(lambda: staging.check_writable(
                "MODEL", args.model, "train would replace it"))
            if args.keep > 1:
                plan.checks.append(lambda: checkpoint.check_history(args.model, args.keep))
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
        if args.trace:
            writes("--trace", args.trace, "written by --trace")
        if args.model is not None:
            plan.inputs.update({"--model": args.model, "--data": args.data})
        else:
            from mpinn.tools.graphchallenge import default_paths
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


def check_files(plan: CommandFiles) -> None:
    """Inputs exist and are files; outputs follow ``io.staging.check``; appended files are no input."""
    from mpinn.io import staging

    for flag, paths in plan.inputs.items():
        for path in [paths] if isinstance(paths, str) else paths:
            if os.path.isdir(path):
                raise MpinnError(f"{flag} {path} is a directory, not a file")
            if not os.path.exists(path):
                raise MpinnError(f"{flag} {path}: no such file")
    staging.check(plan.outputs, plan.inputs, plan.force)
    staging.check(plan.appended, plan.inputs, force=True)
    for check in plan.checks:
        check()


held_locks: list = []  # rank 0's locks of this command's outputs, released as it ends


def take_locks(plan: CommandFiles, comm, quiet: bool) -> None:  # noqa: ANN001 - a communicator
    """Lock every file the command writes (rank 0), or refuse on every rank, naming the holder."""
    from mpinn.comm.collectives import on_root
    from mpinn.io import lock

    notes = on_root(comm, lambda: lock.take_all(plan.locked, held_locks))
    if comm.rank == 0 and not quiet:  # once, not once per rank
        for note in notes:
            print(note, file=sys.stderr, flush=True)


def release_locks() -> None:
    from mpinn.io import lock
    lock.release_all(held_locks)


def _plot(args: argparse.Namespace) -> None:
    """``mpinn plot``: one process draws; the pictures need no communication."""
    from mpi4py import MPI

    from mpinn.io import hdf5, schema
    from mpinn.partition.choice import resolve_owner
    from mpinn.partition.metadata import MetadataTable
    from mpinn.partition.traffic import rank_traffic
    from mpinn.tools import plot

    out = plot_out(args)
    if args.kind == "curves":
        plot.training_curves(args.source, out)
    elif args.kind == "timeline":
        plot.timeline(args.source, out)
    else:
        with hdf5.opened(args.source, "r", MPI.COMM_SELF) as f:
            spec = schema.read_spec(f)
            choice = _choice(args)
            nranks = args.ranks or 1
            if choice.name is not None:
                nranks = schema.read_partition(f, choice.name)[1]
            owner, text = resolve_owner(f, spec, choice, nranks, MPI.COMM_SELF)
            table = MetadataTable.build(spec.sizes, owner, nranks)
            traffic = rank_traffic(spec, table, schema.wiring_reader(f, spec)).forward_matrix
        plot.partition_picture(table, traffic, f"{args.source}: {text}, {nranks} ranks", out)
    if not args.quiet:
        print(f"{out}: written")


def _bench(args: argparse.Namespace, comm) -> int:  # noqa: ANN001 - an MPI communicator
    """``mpinn bench sparse-dnn``: generate (or reuse) the network, infer on all ranks, check."""
    from mpinn.comm.collectives import agree
    from mpinn.io import datafile
    from mpinn.tools import graphchallenge

    model, data = args.model, args.data
    if model is None:
        model, data = graphchallenge.default_paths(args.dir, args.neurons, args.layers, args.samples,
                                                   args.seed)

        def make() -> float | None:
            if os.path.exists(model) and os.path.exists(data):
                return None
            os.makedirs(args.dir, exist_ok=True)
            graphchallenge.check_room(args.dir, args.neurons, args.layers, args.samples)
            return graphchallenge.make_challenge(model, data, args.neurons, args.layers, args.samples,
                                        args.seed, comm=comm)

        baseline = agree(comm, make)  # every rank writes layers and runs a share of the truth
        if comm.rank == 0 and not (args.quiet or args.json):
            made = "generated" if baseline is not None else "reused"
            loop = f"; scipy loop on {comm.size} processes {baseline:.3f} s" if baseline else ""
            print(f"{model}: {made}{loop}", flush=True)
    from mpinn.tools import graphchallenge
    batch = min(args.batch_size, agree(comm, lambda: datafile.count_samples(data)))
    result = graphchallenge.run_challenge(model, data, comm, _choice(args), batch, args.drop_dead,
                                          args.exchange, trace=args.trace)
    if comm.rank == 0:
        report = graphchallenge.challenge_json if args.json else graphchallenge.challenge_report
        print(report(result, comm.size), flush=True)
    return 0 if result.correct else EXIT_ERROR


def _convert(args: argparse.Namespace) -> None:
    """The converters: one process, whole layers (never under the engine)."""
    if args.command == "import-graphchallenge":
        from mpinn.io import pytorch
        from mpinn.tools import graphchallenge
        graphchallenge.import_challenge(args.layer_files, args.neurons, args.inputs, args.categories,
                               args.model, args.data, args.samples)
        written = f"{args.model} and {args.data}"
    elif args.command == "import-torch":
        from mpinn.io import pytorch
        from mpinn.tools import graphchallenge
        model = pytorch.load_torch_file(args.source, args.activation, args.output)
        if args.output is None and pytorch.ends_in_logits(model):
            print(f"mpinn: note: {args.source} ends in a Linear with no activation (logits): "
                  f"{args.model} gets an identity output, which trains with squared error; for a "
                  "classifier trained with cross-entropy, import it with --output softmax (the "
                  "same classes, trained with cross-entropy)", file=sys.stderr, flush=True)
        pytorch.from_torch(model, args.model, args.dtype)
        written = args.model
    else:
        from mpinn.io import pytorch
        from mpinn.tools import graphchallenge
        pytorch.save_torch_file(pytorch.to_torch(args.model), args.out)
        written = args.out
    if not args.quiet:
        print(f"{written}: written")


def run(args: argparse.Namespace) -> int:
    """Carry out one parsed command on this rank: its files checked and locked, then the work
    (``COMMANDS``)."""
    from mpi4py import MPI

    from mpinn.comm.collectives import agree

    comm = MPI.COMM_WORLD

    def plan_and_check() -> CommandFiles:
        plan = command_files(args)
        check_files(plan)
        return plan

    take_locks(agree(comm, plan_and_check), comm, args.quiet)
    return COMMANDS[args.command](args, comm) or 0


def _init(args: argparse.Namespace, comm: Any) -> None:
    from mpinn.io import create
    sizes = args.sizes
    activations = [args.activation] * (len(sizes) - 2) + [args.output]
    sparse = create.SparseInit(args.fan_in, args.density)
    create.create_model(args.model, sizes, activations, args.dtype, args.seed, comm,
                        args.storage, sparse, args.cap, args.negative_slope, args.dropout)
    if comm.rank == 0 and not args.quiet:
        print(f"{args.model}: {len(sizes) - 1} layers, sizes {','.join(map(str, sizes))}, "
              f"{args.dtype}")


def _partition(args: argparse.Namespace, comm: Any) -> None:
    from mpinn.tools.inspect import compare, layout_table, store_partition
    choice = _choice(args)
    if args.compare or args.plan:
        text = (compare(args.model, args.ranks, comm, choice.params, args.ranks_per_node)
                if args.compare else layout_table(args.model, args.ranks, args.batch_size, comm))
        if comm.rank == 0:
            print(text)
        return
    store_partition(args.model, args.ranks, choice.strategy, choice.params,
                    args.name or choice.strategy, comm, args.force, args.ranks_per_node)


def _inspect(args: argparse.Namespace, comm: Any) -> None:
    from mpinn.tools.inspect import describe
    text = describe(args.model, comm, args.ranks_per_node)
    if comm.rank == 0:
        print(text)


def _plot_command(args: argparse.Namespace, comm: Any) -> None:
    if comm.rank == 0:
        _plot(args)


def _convert_command(args: argparse.Namespace, comm: Any) -> None:
    from mpinn.comm.collectives import on_root
    on_root(comm, lambda: _convert(args))  # one process converts; the others wait for it


def _data(args: argparse.Namespace, comm: Any) -> None:
    from mpinn.comm.collectives import on_root
    from mpinn.io import create, datafile
    make = (datafile.synthetic_classification if args.kind == "classification"
            else datafile.synthetic_regression)

    def write() -> None:
        values = args.samples * (args.features + args.outputs)
        create.check_space(args.out, values * 8, 3 * values * 8,
                           f"a data set of {args.samples:,} samples x {args.features:,} features")
        x, y = make(args.samples, args.features, args.outputs, args.seed, args.dtype)
        datafile.write_data(args.out, x, y)

    on_root(comm, write)
    if comm.rank == 0 and not args.quiet:
        print(f"{args.out}: {args.samples} samples, {args.features} features")


def _with_network(work: Callable[[argparse.Namespace, Any, Any], None]
                  ) -> Callable[[argparse.Namespace, Any], None]:
    """A command on the opened model (train, evaluate, predict): the batch fitted to the
    data, the layout chosen, the ``Network`` opened with the model's lock held."""
    def command(args: argparse.Namespace, comm: Any) -> None:
        from mpinn.api import Network
        from mpinn.comm.collectives import agree
        from mpinn.io import datafile
        # a batch is never larger than the data: buffers are sized by it
        args.batch_size = min(args.batch_size,
                              agree(comm, lambda: datafile.count_samples(args.data)))
        if args.command == "train":
            args.micro_batches = min(args.micro_batches, args.batch_size)
        if args.replicas == "auto":
            _choose_layout(args, comm, comm.rank == 0)
        with Network(args.model, _choice(args), comm, replicas=args.replicas,
                     exchange=args.exchange, locked=True) as net:
            work(args, comm, net)
    return command


def _train(args: argparse.Namespace, comm: Any, net: Any) -> None:
    from mpinn.io import datafile
    rank0 = comm.rank == 0
    if rank0 and not args.quiet:
        layout = (f" = {args.replicas} replicas x {comm.size // args.replicas}"
                  if args.replicas > 1 else "")
        print(f"training {args.model} on {comm.size} ranks{layout} ({net.partition_text}), "
              f"{datafile.count_samples(args.data)} samples", flush=True)
        if args.strategy == "mincut" and args.partition is None:
            # METIS is run again by every later command: say how to keep this one
            print(f"mpinn: note: this mincut partition is not stored in {args.model}; "
                  f"store it with mpinn partition {args.model} --ranks "
                  f"{comm.size // args.replicas} --strategy mincut --name NAME and "
                  "use --partition NAME", file=sys.stderr, flush=True)
    # every training option is a flag of the same name (config.TrainConfig), but these
    options = {f.name: getattr(args, f.name) for f in training_fields()
               if f.metadata["cli"] and f.name not in ("shuffle", "progress")}
    history = net.fit(
        args.data, validation_data=args.val_data, batch_size=args.batch_size,
        shuffle=not args.no_shuffle, verbose=not args.quiet, force=args.force,
        progress=not args.quiet and (args.progress or sys.stderr.isatty()), **options)
    if rank0 and history.stopped_by:
        print(f"mpinn: stopped by {history.stopped_by}: checkpoint committed at epoch "
              f"{history.epoch}, batch {history.batch}; continue with --resume", flush=True)
    if rank0 and args.resume and not history.epochs and not history.stopped_by:
        print(_nothing_to_train(args.model, net.model.state, args.epochs), flush=True)
    if rank0 and history.stopped_early == "patience" and not args.quiet:
        print(f"stopped early: no lower validation loss for {args.patience} epochs "
              f"(best {history.best_val_loss:.6f})", flush=True)


def _evaluate(args: argparse.Namespace, comm: Any, net: Any) -> None:
    from mpinn.io import datafile
    metrics = net.evaluate(args.data, batch_size=args.batch_size)
    if comm.rank == 0:
        acc = (f"  accuracy {metrics['accuracy']:.4f}" if metrics["accuracy"] is not None
               else "")
        print(f"loss {metrics['loss']:.6f}{acc}  samples {datafile.count_samples(args.data)}  "
              f"model {args.model}  data {args.data}")


def _predict(args: argparse.Namespace, comm: Any, net: Any) -> None:
    """Each rank writes its own output columns: no rank gathers them all."""
    from mpinn import train
    from mpinn.io import datafile, staging
    model = net.model
    data = datafile.load(args.data, model.table, model.spec.dtype, comm, model.group)
    values = train.predict(model, data, args.batch_size)
    columns = model.shard.layers[-1].rows
    if model.groups.index > 0:  # with replicas every group has them: group 0 writes
        columns, values = columns[:0], values[:0]
    with staging.staged_collective(args.out, comm) as partial:
        datafile.write_outputs(partial, data.n_samples, model.spec.sizes[-1], columns, values,
                               comm)
    if comm.rank == 0 and not args.quiet:
        print(f"{args.out}: outputs of {data.n_samples} samples")


# every command of the parser, with the function that carries it out on every rank
COMMANDS: dict[str, Callable[[argparse.Namespace, Any], int | None]] = {
    "init": _init, "partition": _partition, "inspect": _inspect, "plot": _plot_command,
    "bench": lambda args, comm: _bench(args, comm), "data": _data,
    "import-graphchallenge": _convert_command, "import-torch": _convert_command,
    "export-torch": _convert_command, "train": _with_network(_train),
    "evaluate": _with_network(_evaluate), "predict": _with_network(_predict)}


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

    from mpinn.comm.failures import FailureChannel, combine_errors

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
            print_error(message)
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
            print_error(text)
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
