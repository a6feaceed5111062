"""The Python API: ``Network`` (create, open, fit, predict, evaluate, save) and ``History``.

A script runs under ``mpirun -n N python -m mpi4py script.py``; every rank runs the same
calls (they are collective), each rank holds only its own neurons, and results that a
user reads (``History``, ``predict``, ``evaluate``) are the same on every rank::

    import mpinn

    net = mpinn.Network.create("m.h5", sizes=[64, 128, 10], seed=1, force=True)
    with mpinn.Network.open("m.h5", strategy="percentage", percentages=[30, 30, 40]) as net:
        history = net.fit(X, y, epochs=20, batch_size=64, optimizer="adam", lr=1e-3,
                          validation_data=(Xv, yv))
        probs = net.predict(Xv)                 # (samples, outputs) on every rank

The API is a thin layer over ``train`` (the loop), ``data`` (a rank's columns of the
data) and ``format`` (the file): the command line runs the same code.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

import numpy as np
from mpi4py import MPI

from mpinn import config, train
from mpinn import model as mpinn_model
from mpinn.comm.collectives import agree, gather_layer, on_root
from mpinn.comm.exchange import check_exchange
from mpinn.comm.watchdog import collective, meet
from mpinn.config import TrainConfig
from mpinn.errors import MpinnError, install_excepthook
from mpinn.io import create as mpinn_create
from mpinn.io import hdf5, lock, schema, staging
from mpinn.io.datafile import LocalData, from_arrays, load
from mpinn.partition import choice as mpinn_choice
from mpinn.partition.choice import partition_choice
from mpinn.trace import NULL, Tracer

install_excepthook()  # an MpinnError nobody catches is one line, not a traceback per rank

Callback = Callable[[dict[str, Any]], Any]
F = TypeVar("F", bound=Callable[..., Any])

OPEN_BATCH = 256  # batch an opened network is ready for before fit or predict ask for more


@dataclass
class History:
    """What ``fit`` did: one dict per epoch, the same on every rank but for the timings.

    Each entry has the keys of ``train --log-json`` (epoch, loss, accuracy,
    samples_per_second, time) and val_loss, val_accuracy (None without validation data).
    """

    epochs: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str | None = None     # a signal (SIGTERM, SIGUSR1) that preempted the run
    stopped_early: str | None = None  # "patience" or "callback"
    best_val_loss: float | None = None
    epoch: int = 0                    # epochs complete in the file when fit returned
    batch: int = 0                    # batches done of the next epoch (a preempted run)

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, key: str) -> list[Any]:
        """One key over the epochs, Keras-style: ``history["val_loss"]``."""
        return [record[key] for record in self.epochs]


def _collective(call: str) -> Callable[[F], F]:
    """A collective method of ``Network``: its first use loads the model (meeting the other
    ranks as "load", as a property read on every rank would), then it meets them as
    ``call`` (``watchdog.meet``): the same sequence on every rank, whichever loaded first."""
    def decorate(method: F) -> F:
        @functools.wraps(method)
        def watched(self: Network, *args: Any, **kwargs: Any) -> Any:
            self.model  # noqa: B018 - loads it, collectively, where not loaded yet
            meet(self.comm, call)
            return method(self, *args, **kwargs)
        return watched  # type: ignore[return-value]
    return decorate


class Network:
    """A model file opened on every rank of ``comm``, partitioned at neuron granularity.

    Every method is collective: call it on every rank with the same arguments; a call
    made on some ranks only ends the job with one line after ``MPINN_COLLECTIVE_TIMEOUT``
    seconds (``mpinn.comm.watchdog``). Errors are raised as ``MpinnError`` on every rank. The
    calls that write the model (``create``, ``fit``, ``save``) hold its lock, as the CLI
    does, and refuse a model committed by another handle or job since this one loaded it.
    Build one with ``Network.create`` or ``Network.open``; close it with ``close()`` or a
    ``with`` block.
    """

    def __init__(self, path: str | os.PathLike[str], choice: mpinn_choice.PartitionChoice,
                 comm: MPI.Comm | None = None, dtype: str | None = None,
                 replicas: int = 1, exchange: str = "auto", *, locked: bool = False) -> None:
        """``locked``: the caller holds the locks of the files that ``fit`` and ``save``
        write (the CLI takes them before any work)."""
        self.path = os.fspath(path)
        self._locked = locked
        self._writing = False  # inside fit: a callback's save needs no second lock
        self._replicas = replicas
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self._choice = choice
        self._dtype = dtype
        self._exchange = exchange
        self._model: mpinn_model.DistributedModel | None = None
        self._closed = False

    # ------------------------------------------------------------ making and opening

    @classmethod
    @collective("create")
    def create(cls, path: str | os.PathLike[str], sizes: Sequence[int] | str,
               activation: str | Sequence[str] = "relu", output: str = "softmax", seed: int = 0,
               *, storage: str | Sequence[str] = "dense", fan_in: int | None = None,
               density: float | None = None, cap: float | None = None,
               negative_slope: float = 0.01, dropout: float | Sequence[float] = 0.0,
               dtype: str = "float32", force: bool = False,
               comm: MPI.Comm | None = None) -> Network:
        """Write a new, initialised model file (what ``mpinn init`` does) and return it.

        The file is the same whatever the number of ranks (He-uniform weights for the
        ReLU-like activations, Glorot otherwise; zero biases). Collective.

        Parameters
        ----------
        path : str or os.PathLike
            The model file to write.
        sizes : list of int, or str
            Neurons per layer, inputs first: ``[64, 128, 10]`` or ``"64,128,10"``.
        activation : str or list of str
            The hidden layers' activation, one name or one per hidden layer: identity,
            relu, relu_cap, sigmoid, tanh, gelu, silu, leaky_relu.
        output : str
            The last layer's: softmax (classification: cross-entropy on integer labels),
            identity (regression: squared error on float targets) or a hidden one.
        seed : int
            Seed of the initial weights (and of the wiring of csr layers).
        storage : str or list of str
            dense or csr, for all layers or one per layer.
        fan_in, density : int, float, optional
            csr layers: ``fan_in`` K random inputs per neuron, or each connection present
            with probability ``density``.
        cap : float, optional
            The ceiling of relu_cap.
        negative_slope : float
            leaky_relu's slope below zero (torch's 0.01).
        dropout : float or list of float
            The rate, in [0, 1), at which training drops the hidden layers' activations
            (one rate, or one per hidden layer), stored in the file; ``fit`` uses it
            unless given its own ``dropout``.
        dtype : str
            float32 or float64.
        force : bool
            Overwrite an existing file (never one another job holds the lock of).
        comm : mpi4py.MPI.Comm, optional
            The ranks; default ``MPI.COMM_WORLD``.

        Returns
        -------
        Network
            On the new file, with the balanced partition, loaded at its first use;
            ``Network.open`` chooses another partition.

        Raises
        ------
        MpinnError
            On every rank, before anything is written: a bad argument, an existing file
            without ``force``, a directory that is missing or read-only, a file another
            job is writing.
        """
        config.check_on(comm, "create", locals())
        path = os.fspath(path)
        comm = comm if comm is not None else MPI.COMM_WORLD

        def check() -> tuple[list[int], list[str], list[str]]:
            layers = _ints(sizes, "sizes")
            if len(layers) < 2:
                raise MpinnError(f"sizes needs at least two layers, got {layers}")
            hidden = [activation] * (len(layers) - 2) if isinstance(activation, str) \
                else list(activation)
            if len(hidden) != len(layers) - 2:
                raise MpinnError(f"activation gives {len(hidden)} names for "
                                 f"{len(layers) - 2} hidden layers")
            storages = [s.strip() for s in storage.split(",")] if isinstance(storage, str) \
                else list(storage)
            if "csr" not in storages and (fan_in is not None or density is not None):
                raise MpinnError("fan_in and density apply to storage csr layers only")
            # a directory, or a directory that is missing or read-only (an existing file:
            # below, with the API's own words)
            staging.check({"create: path": path}, {}, force=True)
            if os.path.exists(path) and not force:
                raise MpinnError(f"{path} exists; pass force=True to overwrite it")
            return layers, [*hidden, output], storages

        # every rank agrees before anything is written: a file seen by one rank only
        # (node-local storage) stops them all
        layers, activations, storages = agree(comm, check)
        with _locks(comm, [path], "written by Network.create"):
            mpinn_create.create_model(path, layers, activations, dtype, seed, comm, storages,
                             mpinn_create.SparseInit(fan_in, density), cap, negative_slope, dropout)
        return cls(path, mpinn_choice.PartitionChoice(), comm)

    @classmethod
    @collective("open")
    def open(cls, path: str | os.PathLike[str], strategy: str | None = None, *,
             counts: Any = None, percentages: Any = None, ids: Any = None,
             layer_ranks: Any = None, partition: str | None = None, dtype: str | None = None,
             replicas: int = 1, exchange: str = "auto",
             comm: MPI.Comm | None = None) -> Network:
        """Open a model file on every rank of ``comm``: each rank reads its own rows.

        Collective. The results of ``fit``, ``predict`` and ``evaluate`` are the same
        whatever the partition, the replicas and the exchange kind.

        Parameters
        ----------
        path : str or os.PathLike
            A model file (``create``, ``mpinn init``, ``mpinn import-torch``).
        strategy : str, optional
            balanced (the default), count (``counts``), percentage (``percentages``), ids
            (``ids``), layers (``layer_ranks``), nnz or mincut (needs pymetis). A
            strategy's parameter alone names it (``counts=`` means count).
        counts, percentages, layer_ranks : list of int, or str, optional
            Neurons per rank; percent of all neurons per rank (sum 100); the owner of
            each layer, inputs first. A list, or the command line's text ``"10,20"``.
        ids : dict or str, optional
            ``{rank: [gid or [start, stop)]}``, or the path of that JSON file.
        partition : str, optional
            A partition stored in the file by ``mpinn partition`` (instead of a strategy).
        dtype : str, optional
            float32 or float64: refuse a file whose weights are of another precision.
        replicas : int
            R (data x neuron parallelism): the P ranks form R groups of Q = P / R
            contiguous ranks, the partition is made for Q, every group holds a copy of the
            model; ``fit`` splits each batch over the groups and sums their gradients,
            ``predict`` and ``evaluate`` split the samples.
        exchange : str
            How layers exchange activations: auto, alltoallv, allgather, collective,
            neighbor, node or node-forward (see the guide on layouts).
        comm : mpi4py.MPI.Comm, optional
            The ranks; default ``MPI.COMM_WORLD``.

        Returns
        -------
        Network
            Loaded: a bad file or a partition that does not fit fails here.

        Raises
        ------
        MpinnError
            On every rank: a bad argument, a file that is missing, damaged or not a model,
            a partition that does not fit the model or the rank count, R not dividing P.
        """
        config.check_on(comm, "open", locals())
        def check() -> mpinn_choice.PartitionChoice:
            if dtype is not None and dtype not in schema.DTYPES:
                raise MpinnError(f"dtype {dtype!r} is not supported (float32 or float64)")
            check_exchange(exchange)
            return partition_choice(strategy, counts=counts, percentages=percentages, ids=ids,
                                    layer_ranks=layer_ranks, partition=partition)

        choice = agree(comm if comm is not None else MPI.COMM_WORLD, check)
        net = cls(path, choice, comm, dtype, replicas, exchange)
        net.model  # noqa: B018 - loaded now, so a bad file or partition fails here
        return net

    @property
    def model(self) -> mpinn_model.DistributedModel:
        """This rank's view of the opened model (spec, partition table, shard, engine);
        its first use loads it, collectively."""
        if self._closed:
            raise MpinnError(f"{self.path}: the network is closed")
        if self._model is None:
            meet(self.comm, "load")  # loading is collective: it meets the other ranks too
            model = mpinn_model.DistributedModel(self.path, self.comm, self._choice, OPEN_BATCH,
                                          training=False, replicas=self._replicas,
                                          exchange=self._exchange)
            if self._dtype is not None and np.dtype(self._dtype) != model.spec.dtype:
                model.close()  # every rank read the same spec: they all close here
                raise MpinnError(f"{self.path} holds {model.spec.dtype} weights, not "
                                 f"{np.dtype(self._dtype)}", agreed=True)
            self._model = model
        return self._model

    # ------------------------------------------------------------ what it is

    @property
    def sizes(self) -> tuple[int, ...]:
        """Neurons per layer, inputs first."""
        return self.model.spec.sizes

    @property
    def dtype(self) -> np.dtype:
        """The weights' numpy dtype (float32 or float64)."""
        return self.model.spec.dtype

    @property
    def partition_text(self) -> str:
        """Where the partition came from, e.g. "strategy balanced"."""
        return self.model.partition_text

    @property
    def epoch(self) -> int:
        """Epochs trained so far (the file's training state)."""
        return int(self.model.state.get("epoch", 0))

    @property
    def replicas(self) -> int:
        """R, the copies of the model over the ranks (``open(replicas=)``)."""
        return self.model.replicas

    def rows(self, layer: int) -> np.ndarray:
        """The in-layer indices of the neurons of ``layer`` this rank owns (0: the inputs)."""
        return self.model.table.rows(layer, self.model.group.rank)

    # ------------------------------------------------------------ training and inference

    @_collective("fit")
    def fit(self, x: Any, y: Any = None, *, epochs: int = 1, batch_size: int = 64,
            optimizer: str | None = None, lr: float | None = None,
            momentum: float | None = None, seed: int = 0, shuffle: bool = True,
            validation_data: Any = None, callbacks: Iterable[Callback] = (),
            checkpoint_every: int = 0, keep: int = 1, resume: bool = False,
            micro_batches: int = 1, patience: int = 0, keep_best: bool = False,
            schedule: str | None = None, step_size: int | None = None,
            gamma: float | None = None, min_lr: float | None = None,
            warmup_steps: int | None = None, weight_decay: float | None = None,
            clip_norm: float | None = None, dropout: float | None = None,
            reset_optimizer: bool = False, progress: bool = False,
            log_json: str | None = None, verbose: bool = False, force: bool = False,
            trace: str | None = None) -> History:
        """Train the model in place and commit it (what ``mpinn train`` does).

        Collective. The keyword arguments are ``mpinn train``'s flags, with the same
        defaults. The run settings (``optimizer`` to ``dropout``) left as None continue the
        model's last run: its stored values, else sgd, lr 0.1 and no momentum, decay,
        schedule or clipping (the guide "Resume and continue").

        Parameters
        ----------
        x : numpy array or str
            (samples, features) inputs, the same on every rank (each rank copies its own
            columns), or the path of a data file holding X and y.
        y : numpy array, optional
            (samples,) integer class labels, or (samples, outputs) float targets
            (regression); None with a data file.
        epochs : int
            Epochs to train; with ``resume``, until this many are complete in all.
        batch_size : int
            Samples per step (the global batch, over all ranks).
        optimizer : str, optional
            sgd, adam or adamw. Another optimizer than the one whose state the file holds
            is refused unless ``reset_optimizer``.
        lr, momentum, weight_decay : float, optional
            Learning rate (> 0), SGD momentum in [0, 1), weight decay >= 0 (L2 in the
            gradient for sgd and adam, decoupled for adamw, as torch).
        seed : int
            Shuffling seed: epoch e visits the samples in ``default_rng([seed, e])``'s order.
        shuffle : bool
            False: every epoch in file order.
        validation_data : (numpy array, numpy array) or str, optional
            (Xv, yv) or a data file, evaluated after every epoch (val_loss, val_accuracy).
        callbacks : iterable of callables
            Each gets every epoch's dict on every rank; one that returns False (on any
            rank) stops training after that epoch.
        checkpoint_every, keep : int
            Also commit every K epochs (0: only at the end); keep the model and K-1 older
            checkpoints in ``MODEL.checkpoints/``.
        resume : bool
            Continue the stored run until ``epochs`` are complete, from its exact batch.
        micro_batches : int
            Run each batch as a pipeline of M micro-batches (GPipe).
        patience : int
            Stop after K epochs without a lower validation loss (0: never).
        keep_best : bool
            Also commit each new best validation loss to MODEL.best.h5.
        schedule : str, optional
            constant, step (every ``step_size`` epochs times ``gamma``) or cosine (down
            to ``min_lr`` at the last step), with ``warmup_steps``.
        step_size, gamma, min_lr, warmup_steps : optional
            The schedule's parameters.
        clip_norm : float, optional
            Clip the global gradient norm over all ranks (as torch's
            ``clip_grad_norm_``); 0 is off.
        dropout : float, optional
            Inverted dropout on the hidden layers while training, the same masks at any
            rank count; None uses the rates the file stores per layer.
        reset_optimizer : bool
            Drop the optimizer state the file holds and start afresh (needed to change
            ``optimizer``).
        progress, verbose : bool
            A progress bar; an epoch line on rank 0.
        log_json : str, optional
            Append each epoch's dict to this file (rank 0).
        force : bool
            Replace a MODEL.best.h5 that this model's training did not write, or an
            existing ``trace`` file.
        trace : str, optional
            Write the run's timeline there: one Chrome trace of every rank's spans.

        Returns
        -------
        History
            One dict per epoch, the same on every rank but for the timings, and how the
            run ended (``stopped_by``, ``stopped_early``, ``best_val_loss``).

        Raises
        ------
        MpinnError
            On every rank: a bad argument (before any work), data that does not fit the
            model, a model another job or handle is writing or has committed since this
            one loaded it, a callback that raised (an exception, Ctrl-C, ``sys.exit``;
            the model as its last checkpoint left it).
        """
        given = locals()
        model = self.model
        config.check_on(self.comm, "fit", given)  # after the load: see config.check_on
        options = TrainConfig(**{f.name: given[f.name] for f in fields(TrainConfig)})
        if keep_best:
            agree(self.comm, lambda: train.check_best(self.path, force))
        data = self._data(x, y, "X", "fit data")
        validation = None
        if validation_data is not None:
            if isinstance(validation_data, (str, os.PathLike)):
                validation = self._data(validation_data, None, "Xv", "validation_data")
            elif isinstance(validation_data, tuple) and len(validation_data) == 2:
                validation = self._data(*validation_data, "Xv", "validation_data")
            else:
                raise MpinnError("validation_data must be a tuple (Xv, yv) or a data file path")

        def check() -> dict[str, Any]:
            if log_json is not None:  # checked before any epoch, as the CLI does
                staging.check({"fit: log_json": os.fspath(log_json)}, {"the model": self.path},
                              force=True)
            if trace is not None:
                staging.check({"fit: trace": os.fspath(trace)}, {"the model": self.path},
                              force=bool(force))
            return train.resolve_run(self.path, model.state, options.named_run(),
                                     bool(reset_optimizer))

        run = agree(self.comm, check)
        tracer = Tracer(self.comm) if trace is not None else NULL
        history = History()
        callbacks = list(callbacks)

        def on_epoch(stats: train.EpochStats) -> bool:
            record = stats.record(validation=True)
            history.epochs.append(record)
            answers = [_call_back(callback, record) for callback in callbacks]
            return not any(answer is False for answer in answers)

        rank0 = self.comm.rank == 0
        written = [self.path, *([train.best_path(self.path)] if keep_best else [])]
        with self._write_access(written, "trained by Network.fit"):
            result = train.train(
                model, data, replace(options, **run, progress=bool(progress) and rank0),
                report=train.epoch_reporter(not verbose, log_json) if rank0 else None,
                validation=validation, on_epoch=on_epoch, tracer=tracer)
        if trace is not None:
            tracer.write(os.fspath(trace))
        history.stopped_by, history.stopped_early = result.stopped_by, result.stopped_early
        history.best_val_loss, history.epoch = result.best_val_loss, result.epoch
        history.batch = result.batch
        return history

    @_collective("predict")
    def predict(self, x: Any, batch_size: int | None = None) -> np.ndarray:
        """The output layer's activations for ``x``. Collective.

        Parameters
        ----------
        x : numpy array or str
            (samples, features) inputs, the same on every rank, or a data file.
        batch_size : int, optional
            Samples per pass (default: what the network is ready for, 256).

        Returns
        -------
        numpy.ndarray
            (samples, outputs), the same array on every rank.

        Raises
        ------
        MpinnError
            On every rank: a bad argument, inputs that do not fit the model.
        """
        model = self.model
        config.check_on(self.comm, "predict", locals())  # after the load: see config.check_on
        data = self._data(x, None, "X", "predict data")
        local = train.predict(model, data, batch_size or model.engine.max_batch)
        whole = gather_layer(model.group, model.table.layer_owner(len(model.spec.sizes) - 1),
                             local)
        return np.ascontiguousarray(whole.T)

    @_collective("evaluate")
    def evaluate(self, x: Any, y: Any = None, batch_size: int | None = None) -> dict[str, Any]:
        """The mean loss and accuracy on ``x``, ``y``. Collective.

        Parameters
        ----------
        x : numpy array or str
            (samples, features) inputs, the same on every rank, or a data file with y.
        y : numpy array, optional
            Integer labels or float targets; None with a data file.
        batch_size : int, optional
            Samples per pass (default 256).

        Returns
        -------
        dict
            ``{"loss": mean loss, "accuracy": fraction right}``; accuracy is None for float
            targets (regression).

        Raises
        ------
        MpinnError
            On every rank: a bad argument, no y, data that does not fit the model.
        """
        model = self.model
        config.check_on(self.comm, "evaluate", locals())  # after the load: see config.check_on
        data = self._data(x, y, "X", "evaluate data")
        if data.labels is None and data.targets is None:
            raise MpinnError("evaluate needs y (labels or targets)")
        loss, accuracy = train.evaluate(model, data, batch_size or model.engine.max_batch)
        return {"loss": loss, "accuracy": accuracy}

    @_collective("save")
    def save(self) -> None:
        """Commit the weights, the optimizer state and the training counters to the file
        (complete, then swapped in). ``fit`` already does after its last epoch. Collective.

        Raises
        ------
        MpinnError
            On every rank: the file is locked by another job, or was committed by another
            handle or job since this one loaded it.
        """
        model = self.model
        with self._write_access([self.path], "written by Network.save"):
            model.save(model.stored_optimizer())

    def close(self) -> None:
        """Close the file on every rank (the network cannot be used afterwards)."""
        if self._model is not None and not self._closed:
            meet(self.comm, "close")
            self._model.close()
        self._model = None
        self._closed = True

    # ------------------------------------------------------------ writing the model

    @contextmanager
    def _write_access(self, paths: list[str], action: str) -> Iterator[None]:
        """Hold the locks of ``paths`` (unless the caller holds them, as the CLI does) and
        refuse, on every rank, a model file committed since this handle loaded it: writing
        would put older weights back. Inside fit (a callback's ``save``): nothing more."""
        if self._writing:
            yield
            return
        self._writing = True
        try:
            with _locks(self.comm, [] if self._locked else paths, action):
                model = self.model

                def check() -> None:
                    if hdf5.file_identity(self.path) != model.committed:
                        raise MpinnError(
                            f"{self.path} was committed by another Network handle or job since "
                            "this one loaded it; writing now would put older weights back: "
                            "open it again (Network.open) to work on the newest weights")
                on_root(self.comm, check)
                yield
        finally:
            self._writing = False

    def __enter__(self) -> Network:
        return self

    def __exit__(self, _type: type | None, exc: BaseException | None, _tb: object) -> None:
        if hdf5.safe_to_close(exc):  # never a collective close that only some ranks reach
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._model else "not loaded"
        replicas = f", replicas={self._replicas}" if self._replicas != 1 else ""
        return f"Network({self.path!r}, {state}, ranks={self.comm.size}{replicas})"

    # ------------------------------------------------------------ data

    def _data(self, x: Any, y: Any, name: str, source: str) -> LocalData:
        model = self.model
        if isinstance(x, (str, os.PathLike)):
            if y is not None:
                raise MpinnError(f"{source}: give arrays X and y, or a data file without y")
            return load(os.fspath(x), model.table, model.spec.dtype, self.comm, model.group)
        return from_arrays(x, y, model.table, model.spec.dtype, self.comm, name, source,
                           model.group)


@contextmanager
def _locks(comm: MPI.Comm, paths: list[str], action: str) -> Iterator[None]:
    """Rank 0 holds the locks of ``paths`` for the block (``lock.take_all``: a file another
    job, or another handle of this process, is writing is refused on every rank)."""
    held: list[lock.Lock] = []

    def take() -> list[str]:
        try:
            return lock.take_all(dict.fromkeys(paths, action), held)
        except BaseException:
            lock.release_all(held)
            raise

    notes = on_root(comm, take)
    if comm.rank == 0:  # once, not once per rank
        for note in notes:
            print(note, file=sys.stderr, flush=True)
    try:
        yield
    finally:
        lock.release_all(held)


def _call_back(callback: Callback, record: dict[str, Any]) -> Any:
    """Run a user's callback; Ctrl-C or ``sys.exit`` in it become an error that stops
    training on every rank (``train._agreed_stop``), not a rank leaving the others waiting."""
    try:
        return callback(record)
    except (KeyboardInterrupt, SystemExit) as exc:
        what = type(exc).__name__ + (f"({exc.code!r})" if isinstance(exc, SystemExit) else "")
        raise MpinnError(f"fit: a callback raised {what} after epoch {record.get('epoch')}; "
                         "training stopped on every rank, the model as its last checkpoint "
                         "left it") from None


def _ints(values: Sequence[int] | str, name: str) -> list[int]:
    """``[64, 128, 10]`` or the command line's ``"64,128,10"`` as whole numbers."""
    items = values.split(",") if isinstance(values, str) else list(values)
    try:
        numbers = [int(v) for v in items]
    except (TypeError, ValueError):
        raise MpinnError(f"{name}: cannot read {values!r} as whole numbers") from None
    if any(isinstance(v, float) and not float(v).is_integer() for v in items):
        raise MpinnError(f"{name}: {values!r} are not whole numbers")
    return numbers
