"""The loop: open a model on every rank, then train, evaluate or predict batch by batch.

One batch goes: ``LocalData.batch`` (this rank's input features) -> ``Engine.forward``
(exchange + kernels per layer) -> ``Engine.loss_and_grad`` -> ``Engine.backward`` ->
``Optimizer.step`` on the rank's own rows. Checkpoints write every rank's rows into a
new model file, collectively, and swap it in atomically (``io.checkpoint.Checkpoint``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpinn.model import DistributedModel

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from mpi4py import MPI

from mpinn._testing.faults import inject_fault
from mpinn.comm.collectives import MAX, SUM, agree, allreduce
from mpinn.config import RUN_DEFAULTS, TrainConfig
from mpinn.errors import Interrupted, MpinnError
from mpinn.io import checkpoint
from mpinn.io.datafile import LocalData, check_distributions
from mpinn.optim import (
    OPTIMIZERS,
    SCHEDULES,
    SGD,
    Schedule,
    clip_coefficient,
    make_optimizer,
    steps_in_backward,
)
from mpinn.trace import NULL, NullTracer

# The settings of a training run that the file records (/state "run") and that a continued
# or resumed run takes from there unless its caller names another value (None: not named)
# are config.RUN_DEFAULTS.
# the optimizer's own settings: with --reset-optimizer they come from the caller or the
# defaults, never from the file
OPTIMIZER_SETTINGS = ("optimizer", "lr", "momentum", "weight_decay")


def stored_run(state: dict[str, Any]) -> dict[str, Any]:
    """The run settings the file records: its "run" record, or for a file written before
    there was one, what its optimizer and schedule records hold. Empty for a new model."""
    run = state.get("run")
    if isinstance(run, dict):
        return {key: run[key] for key in RUN_DEFAULTS if key in run}
    found: dict[str, Any] = {}
    optimizer = state.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("name") in OPTIMIZERS:
        found["optimizer"] = optimizer["name"]
        for key in ("lr", "momentum", "weight_decay"):
            if key in optimizer:
                found[key] = optimizer[key]
    schedule = state.get("schedule")
    if isinstance(schedule, dict):  # its lr is the base rate (the optimizer's, the last step's)
        found.update({("schedule" if key == "name" else key): schedule[key]
                      for key in ("name", "lr", "step_size", "gamma", "min_lr", "warmup_steps")
                      if key in schedule})
    return found


def _stored_setting(key: str, value: Any) -> Any:
    """A run setting read from a file, of the type the run needs (files are not trusted)."""
    if key == "optimizer":
        good = value in OPTIMIZERS
    elif key == "schedule":
        good = value in SCHEDULES
    elif key == "dropout" and value is None:
        good = True
    else:
        good = (isinstance(value, (int, float)) and not isinstance(value, bool)
                and bool(np.isfinite(value)))
    if not good:
        raise MpinnError(f"the model's /state records {key} = {value!r}, which is not a valid "
                         f"setting; name {key} explicitly to train it")
    return value


def _holds_state(record: Any) -> bool:
    """Whether a stored optimizer record comes with state arrays (Adam's moments, SGD's
    momentum buffer): plain SGD has none, and switching from it throws nothing away."""
    if not isinstance(record, dict):
        return False
    return record.get("name") in ("adam", "adamw") or bool(record.get("momentum"))


def resolve_run(path: str, state: dict[str, Any], named: dict[str, Any],
                reset_optimizer: bool = False) -> dict[str, Any]:
    """Every run setting: the caller's where named (not None), else the file's, else
    ``RUN_DEFAULTS``. Naming another optimizer than the one whose state the file holds
    would throw that state away: refused unless ``reset_optimizer``, which starts the
    optimizer afresh (its settings from the caller and the defaults only)."""
    unknown = sorted(set(named) - set(RUN_DEFAULTS))
    if unknown:
        raise MpinnError(f"unknown training settings: {', '.join(unknown)}")
    stored = stored_run(state)
    if reset_optimizer:
        stored = {key: value for key, value in stored.items() if key not in OPTIMIZER_SETTINGS}
    elif (_holds_state(state.get("optimizer")) and named.get("optimizer") is not None
            and named["optimizer"] != stored.get("optimizer")):
        raise MpinnError(
            f"{path} holds the state of optimizer {stored['optimizer']} (from its last run); "
            f"training it with {named['optimizer']} would throw that state away: leave the "
            f"optimizer out to continue with {stored['optimizer']}, or pass --reset-optimizer "
            f"(reset_optimizer=True) to start {named['optimizer']} afresh")
    return {key: named[key] if named.get(key) is not None
            else _stored_setting(key, stored[key]) if key in stored else default
            for key, default in RUN_DEFAULTS.items()}


def best_path(path: str) -> str:
    """Where ``keep_best`` keeps the checkpoint of the best validation loss: MODEL.best.h5."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.best{ext or '.h5'}"


BEST_OF = "best_of"  # /state attribute of MODEL.best.h5: the name of MODEL


def check_best(path: str, force: bool) -> None:
    """Refuse, before any training, a ``keep_best`` that would replace a MODEL.best.h5 which
    this model's training did not write (another model's, or any other file), unless
    ``force``. One written by an earlier ``keep_best`` run of this model names it in its
    state and is replaced as before."""
    best = best_path(path)
    if force or not os.path.lexists(best):
        return
    if checkpoint.read_state_value(best, BEST_OF) != os.path.basename(path):
        raise MpinnError(f"{best} exists and was not written by --keep-best training of {path}; "
                         "move it away, or pass --force (fit: force=True) to replace it")


@dataclass
class EpochStats:
    epoch: int
    loss: float
    accuracy: float | None
    samples_per_second: float
    val_loss: float | None = None
    val_accuracy: float | None = None

    def record(self, validation: bool) -> dict[str, Any]:
        """The epoch as one ``--log-json`` object (and one ``History.epochs`` entry)."""
        record = {"epoch": self.epoch, "loss": self.loss, "accuracy": self.accuracy,
                  "samples_per_second": self.samples_per_second, "time": time.time()}
        if validation:
            record.update(val_loss=self.val_loss, val_accuracy=self.val_accuracy)
        return record


def _run_batches(model: DistributedModel, data: LocalData, order: np.ndarray, batch_size: int,
                 step: Callable[[float], bool] | None = None,
                 on_outputs: Callable[[np.ndarray, np.ndarray], None] | None = None,
                 micro_batches: int = 1) -> tuple[float, int, int]:
    """Forward (and ``step``) the batches of ``order``; returns loss share, hits, batches run.

    ``step`` returns True when training must stop after this batch (a preemption signal).
    With ``micro_batches`` > 1 (training only) forward and backward run as a pipeline and
    ``step`` only updates. With replicas, a training batch is split: my group runs its
    contiguous share, the loss divided by the whole batch's size (hits and loss are then
    my group's; the caller sums them over the groups).
    """
    engine = model.engine
    trace = engine.tracer if step is not None else NULL  # a traced run's training steps
    features = np.empty((data.features.shape[0], batch_size), dtype=model.spec.dtype)
    loss_sum, correct, batches = 0.0, 0, 0
    for start in range(0, order.size, batch_size):
        with trace.span("step", "step"):  # one span per batch (a break ends it too)
            index = order[start:start + batch_size]
            divisor = index.size
            if step is not None and model.replicas > 1:
                index = index[model.groups.share(index.size)]
                if index.size == 0:  # a batch smaller than R: this group sits it out
                    engine.no_samples()
                    if micro_batches > 1:  # the others' pipelined steps have posted their sums
                        engine.post_gradients()
                    batches += 1
                    if step(0.0):
                        break
                    continue
            with trace.span("data", "data"):
                x, labels, targets = data.batch(index, features)
            if micro_batches > 1 and step is not None:
                result = engine.pipelined_step(x, labels, targets, micro_batches, samples=index,
                                               divisor=divisor)
                loss_sum += result.loss_sum
                correct += result.correct
                batches += 1
                if step(result.loss_sum):
                    break
                continue
            outputs = engine.forward(x, samples=index if step is not None else None)
            batches += 1
            if on_outputs is not None:
                on_outputs(index, outputs)
            if labels is None and targets is None:
                continue
            result = engine.loss_and_grad(outputs, labels, targets, divisor)
            loss_sum += result.loss_sum
            correct += result.correct
            if step is not None and step(result.loss_sum):
                break
    return loss_sum, correct, batches


class StepGuard:
    """What every rank checks after each step, with one small allreduce: did any rank get a
    stop signal (SIGTERM, or SIGUSR1 from SLURM's --signal), Ctrl-C (SIGINT), or a
    non-finite loss?

    A stop signal makes every rank commit a checkpoint and return; Ctrl-C makes every rank
    raise ``Interrupted`` at the same step, committing nothing (a second Ctrl-C on a rank
    interrupts it at once, as Python would)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.received: str | None = None
        self.interrupted = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StepGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signal.Signals(signum).name

    def _interrupt(self, _signum: int, _frame: object) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def finish(self, where: str) -> None:
        """At the end of training, on every rank: Ctrl-C that came after the last step (in
        the last checkpoint, say) interrupts the caller all the same, on every rank."""
        flag = np.array([self.interrupted], dtype=np.int32)
        if allreduce(self.comm, flag, MAX)[0]:
            self._raise(where)

    def _raise(self, where: str) -> None:
        ranks = [r for r, got in enumerate(self.comm.allgather(self.interrupted)) if got]
        raise Interrupted(f"interrupted (SIGINT on rank{'s' if len(ranks) > 1 else ''} "
                          f"{','.join(map(str, ranks))}) at {where}: every rank stopped; "
                          "the model holds its last checkpoint")

    def stop_requested(self, loss_share: float, where: str) -> bool:
        """True on every rank once any rank has received a stop signal; raises on every
        rank, naming the ranks, if any rank's share of the loss is NaN or infinite, or
        ``Interrupted`` if any rank got Ctrl-C."""
        finite = bool(np.isfinite(loss_share))
        flags = np.array([self.received is not None, not finite, self.interrupted],
                         dtype=np.int32)
        allreduce(self.comm, flags, MAX)
        if flags[2]:
            self._raise(where)
        if flags[1]:
            def check() -> None:
                if not finite:
                    raise MpinnError(f"{where}: the loss is {loss_share} (diverged or bad data); "
                                     "the last checkpoint is kept; try a smaller --lr")
            agree(self.comm, check)
        return bool(flags[0])


def _totals(model: DistributedModel, n_samples: int, loss_sum: float, correct: int, labels: bool
            ) -> tuple[float, float | None]:
    """Mean loss and accuracy: the loss shares of all ranks summed, the hits (the same on
    every rank of a group) summed over the groups."""
    total = allreduce(model.comm, np.array([loss_sum]), SUM)[0]
    correct = int(round(model.groups.sum_across(correct))) if labels else 0
    n = max(n_samples, 1)
    return float(total / n), (correct / n if labels else None)


@dataclass
class TrainResult:
    history: list[EpochStats]
    stopped_by: str | None = None  # the signal that preempted the run, if any
    epoch: int = 0                 # epochs completed when it ended
    batch: int = 0                 # batches done of the next epoch (preemption only)
    seconds_optimizer: float = 0.0
    stopped_early: str | None = None  # "patience" or "callback": ended before its last epoch
    best_val_loss: float | None = None


class EarlyStopping:
    """Patience on the validation loss: stop after ``patience`` epochs without a new best.

    Its counters live in the file's training state, so a run resumed in the middle stops
    at the same epoch as an uninterrupted one.
    """

    def __init__(self, patience: int, state: dict[str, Any]) -> None:
        self.patience = patience
        best = state.get("best_val_loss")
        self.best = float(best) if best is not None else None
        self.bad_epochs = int(state.get("bad_epochs", 0))

    def update(self, val_loss: float) -> bool:
        """Record an epoch's validation loss; True when it is a new best (strictly lower)."""
        if self.best is None or val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {"best_val_loss": self.best, "bad_epochs": self.bad_epochs}


def train(model: DistributedModel, data: LocalData, config: TrainConfig, *,
          report: Callable[[EpochStats], None] | None = None,
          validation: LocalData | None = None,
          on_epoch: Callable[[EpochStats], bool | None] | None = None,
          tracer: NullTracer = NULL) -> TrainResult:
    """Train from the epoch, batch and optimizer state stored in the file, with the options
    of ``config`` (its run settings resolved: ``resolve_run``).

    Without ``resume``, ``epochs`` more epochs are run (an epoch left unfinished by a
    preemption counts as one); with ``resume``, training continues until ``epochs`` epochs
    are complete in all, with the seed stored in the file. Epoch e shuffles with a
    generator seeded by (seed, e), so a run split over several invocations, or killed and
    resumed, visits the samples exactly as one uninterrupted run. SIGTERM or SIGUSR1 make
    every rank finish its step, commit a checkpoint and return. ``micro_batches`` > 1 runs
    each batch as a pipeline of that many micro-batches (same gradients, up to rounding).
    ``progress`` shows a tqdm bar per epoch on stderr (when tqdm is installed).

    ``validation``: its loss and accuracy after every epoch. ``patience`` K > 0: stop
    after K epochs in a row without a lower validation loss (a resumed run that had
    stopped so trains no further). ``keep_best``: each new best is also committed to
    MODEL.best.h5. ``report`` runs on rank 0 after each epoch; ``on_epoch`` on every
    rank, and training stops after the epoch if it returns False on any rank.

    The rate of each step comes from ``optim.Schedule`` (``schedule`` with ``step_size``,
    ``gamma``, ``min_lr``, ``warmup_steps``; cosine's T_max: the optimizer steps up to the
    run's last epoch), counted over the steps stored in the file. ``weight_decay``: L2 in
    the gradient for sgd and adam, decoupled for adamw. ``clip_norm`` C > 0: gradients
    scaled as torch's ``clip_grad_norm_`` by their global L2 norm over all ranks.
    ``dropout`` P: inverted dropout on the hidden layers' outputs in training batches, its
    masks drawn from (seed, step, neuron gid, sample index) (``Engine.set_dropout``).
    None (the default) uses the rates the file stores per layer; a number overrides them
    for every hidden layer (0: none). ``reset_optimizer``: start the optimizer afresh
    instead of restoring the state the file holds. The settings are recorded in the file
    (/state "run") for the next run to continue with (``resolve_run``). ``tracer``: a
    ``trace.Tracer`` that records the run's spans (``--trace``).
    """
    # run settings not named continue the model's last run (done by Network.fit already,
    # agreed over the ranks; here for callers of the loop itself)
    config = replace(config, **resolve_run(model.path, model.state, config.named_run(),
                                           config.reset_optimizer))
    if config.epochs < 0:
        raise MpinnError(f"--epochs must not be negative, got {config.epochs}")
    if config.batch_size < 1:
        raise MpinnError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.checkpoint_every < 0:
        raise MpinnError("--checkpoint-every must not be negative, got "
                         f"{config.checkpoint_every}")
    if config.micro_batches < 1:
        raise MpinnError(f"--micro-batches must be at least 1, got {config.micro_batches}")
    if config.patience < 0:
        raise MpinnError(f"--patience must not be negative, got {config.patience}")
    if (config.patience or config.keep_best) and validation is None:
        raise MpinnError(f"--{'patience' if config.patience else 'keep-best'} needs validation "
                         "data (--val-data)")
    if not np.isfinite(config.clip_norm) or config.clip_norm < 0:
        raise MpinnError("--clip-norm must be a non-negative number (0: off), got "
                         f"{config.clip_norm}")
    if data.labels is None and data.targets is None:
        raise MpinnError("fit needs y: class labels or float targets for every sample of "
                         "X (X alone can only be predicted)")
    if validation is not None and validation.labels is None and validation.targets is None:
        raise MpinnError("validation_data needs y: labels or float targets for every sample")
    if data.n_samples == 0:
        raise MpinnError("X holds no samples: there is nothing to train on")
    if model.spec.layers[-1].activation == "softmax":
        for each in (data, validation) if validation is not None else (data,):
            check_distributions(each, model.group, model.comm)
    engine = model.use_engine(config.batch_size, training=True)
    engine.set_tracer(tracer)
    model.tracer = tracer
    params = engine.parameters()
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.momentum,
                               config.weight_decay)
    if not config.reset_optimizer:
        model.load_optimizer_state(optimizer)
    run = config.named_run()  # recorded for the next run to continue with
    seed = config.seed
    done = int(model.state.get("epoch", 0))
    skip = int(model.state.get("batch", 0))
    step_count = int(model.state.get("step", 0))
    if config.resume:
        if done or skip:  # an interrupted run keeps its own shuffling seed
            seed = int(model.state.get("seed", seed))
        last = config.epochs
        if model.state.get("stopped_early"):
            last = done  # that run is over: resuming it trains no further
    else:
        last = done + config.epochs
    rates = Schedule(config.schedule, config.lr, config.step_size, config.gamma, config.min_lr,
                     config.warmup_steps,
                     t_max=last * -(-data.n_samples // config.batch_size))
    stored = [ly.dropout for ly in model.spec.layers[:-1]]
    engine.set_dropout(stored if config.dropout is None else config.dropout, seed)
    engine.dropout_step = step_count
    _check_position(model, done, skip, data.n_samples, config.batch_size)
    result = TrainResult([], epoch=done)
    early = EarlyStopping(config.patience, model.state)
    result.best_val_loss = early.best

    fuse_sgd = steps_in_backward(isinstance(optimizer, SGD) and optimizer.plain,
                                 model.replicas, config.micro_batches, config.clip_norm)
    stopping = False
    bar = None
    with StepGuard(model.comm) as guard:
        def step(loss_share: float) -> bool:
            nonlocal step_count, stopping
            inject_fault("hold", model.comm.rank)
            idle, engine.idle = engine.idle, False
            with tracer.span("stop check", "wait"):
                stop = guard.stop_requested(loss_share, f"epoch {epoch}, step {step_count + 1}")
            if stop:
                if config.micro_batches > 1:
                    engine.finish_gradients()  # posted by the pipeline: completed, unused
                stopping = True  # before the update: the checkpoint holds this step's start
                return True
            optimizer.lr = rates.rate(step_count, epoch)
            fused = fuse_sgd and not idle
            if config.micro_batches == 1:
                if idle:
                    engine.post_gradients()
                else:
                    engine.backward(sgd_lr=optimizer.lr if fused else None)
            with tracer.span("gradient sum", "wait"):
                engine.finish_gradients()  # summed over the groups (replicas)
            started = time.perf_counter()
            if config.clip_norm:  # over my group's ranks: together they hold every row once
                _clip_gradients(model.group, params, config.clip_norm)
            if not fused:
                optimizer.step()
            result.seconds_optimizer += time.perf_counter() - started
            tracer.add("optimizer", "optimizer", started, time.perf_counter())
            step_count += 1
            engine.dropout_step = step_count
            if bar is not None:
                bar.update(min(config.batch_size, bar.total - bar.n))
            return False

        for epoch in range(done + 1, last + 1):
            order = (np.random.default_rng([seed, epoch]).permutation(data.n_samples)
                     if config.shuffle else np.arange(data.n_samples))[skip * config.batch_size:]
            bar = _progress_bar(epoch, order.size) if config.progress else None
            start = time.perf_counter()
            try:
                loss_sum, correct, batches = _run_batches(
                    model, data, order, config.batch_size, step=step,
                    micro_batches=config.micro_batches)
            finally:
                if bar is not None:
                    bar.close()  # cleared, also before an error message
            if stopping:
                result.stopped_by = guard.received or "a signal on another rank"
                result.epoch, result.batch = epoch - 1, skip + batches - 1
                # early-stopping counters only where epochs write them: with validation
                model.save(optimizer, config.keep, epoch=result.epoch, batch=result.batch,
                           step=step_count, seed=seed, stopped_early=False,
                           schedule=rates.config(), run=run,
                           **(early.state() if validation is not None else {}))
                return result
            seen = order.size
            loss, accuracy = _totals(model, seen, loss_sum, correct, data.labels is not None)
            if not np.isfinite(loss):
                raise MpinnError(f"epoch {epoch}: the loss is {loss} (diverged); try a smaller --lr")
            stats = EpochStats(epoch, loss, accuracy, seen / (time.perf_counter() - start))
            counters: dict[str, Any] = {"epoch": epoch, "batch": 0, "step": step_count,
                                        "seed": seed, "stopped_early": False,
                                        "schedule": rates.config(), "run": run}
            improved = False
            if validation is not None:
                with tracer.span("validation", "validation"):
                    stats.val_loss, stats.val_accuracy = evaluate(model, validation,
                                                                  config.batch_size)
                improved = early.update(stats.val_loss)
                counters.update(early.state())
                result.best_val_loss = early.best
            result.history.append(stats)
            result.epoch, skip = epoch, 0
            if report is not None:
                report(stats)
            if early.exhausted:
                result.stopped_early = "patience"
            if on_epoch is not None and _agreed_stop(model.comm, lambda s=stats: on_epoch(s) is False):
                result.stopped_early = result.stopped_early or "callback"
            if result.stopped_early:
                counters["stopped_early"] = True
            if improved and config.keep_best:
                model.save_best(optimizer, **counters)
            if (epoch == last or result.stopped_early
                    or (config.checkpoint_every and epoch % config.checkpoint_every == 0)):
                model.save(optimizer, config.keep, **counters)
            if result.stopped_early:
                break
        guard.finish(f"the end of epoch {result.epoch}")
    return result


def _check_position(model: DistributedModel, done: int, skip: int, n_samples: int,
                    batch_size: int) -> None:
    """Refuse a stored batch position at or past the end of an epoch: it would run an empty
    epoch and commit it. A preempted run stores fewer batches than an epoch has, so such a
    position is a damaged file, or other data or another batch size than the run it resumes."""
    batches = -(-n_samples // batch_size)
    if skip >= batches:
        raise MpinnError(f"{model.path}: /state attribute 'batch' is {skip}, but epoch {done + 1} "
                         f"has only {batches} batches ({n_samples} samples in batches of "
                         f"{batch_size}): the file's training state is damaged, or this is other "
                         "data or another batch size than the run that stopped")


def _clip_gradients(comm: MPI.Comm, params: list[tuple[np.ndarray, np.ndarray]],
                    max_norm: float) -> None:
    """Scale every rank's gradients by torch's ``clip_grad_norm_`` factor for their global
    L2 norm: each rank sums the squares of its own rows, one allreduce adds them up."""
    squares = np.zeros(1)
    for _, grad in params:
        flat = grad.reshape(-1)
        squares[0] += float(np.dot(flat, flat)) if flat.dtype == np.float64 else \
            float(np.einsum("i,i->", flat, flat, dtype=np.float64))
    allreduce(comm, squares, SUM)
    factor = clip_coefficient(float(np.sqrt(squares[0])), max_norm)
    if factor < 1.0:  # torch multiplies by 1.0 then: the same numbers
        for _, grad in params:
            grad *= factor


def _agreed_stop(comm: MPI.Comm, ask: Callable[[], bool]) -> bool:
    """Ask every rank (a user's callback, which may fail on one rank); True on every rank
    if any rank answers True, the same error on every rank if any rank raised."""
    flag = np.array([int(agree(comm, ask))], dtype=np.int32)
    return bool(allreduce(comm, flag, MAX)[0])


def evaluate(model: DistributedModel, data: LocalData, batch_size: int) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for float targets) over the whole data set; with
    replicas each group runs a contiguous share of the samples."""
    if model.spec.layers[-1].activation == "softmax":
        check_distributions(data, model.group, model.comm)
    model.use_engine(batch_size, training=False)
    share = model.groups.share(data.n_samples)
    order = np.arange(share.start, share.stop)
    loss_sum, correct, _ = _run_batches(model, data, order, batch_size)
    return _totals(model, data.n_samples, loss_sum, correct, data.labels is not None)


def predict(model: DistributedModel, data: LocalData, batch_size: int) -> np.ndarray:
    """Last-layer activations of my output neurons for every sample, (owned outputs, samples).

    With replicas each group predicts a contiguous share of the samples, and the shares
    are gathered over the groups (my rows only: no rank holds the other rows)."""
    model.use_engine(batch_size, training=False)
    share = model.groups.share(data.n_samples)
    outputs = np.empty((model.shard.layers[-1].rows.size, share.stop - share.start),
                       dtype=model.spec.dtype)

    def keep(index: np.ndarray, batch_outputs: np.ndarray) -> None:
        outputs[:, index - share.start] = batch_outputs

    order = np.arange(share.start, share.stop)
    stripped = LocalData(data.spec, data.features, None, None)
    _run_batches(model, stripped, order, batch_size, on_outputs=keep)
    return model.groups.gather_samples(outputs, data.n_samples)


def _progress_bar(epoch: int, samples: int) -> Any:
    """A tqdm bar over the samples of one epoch, or None without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=samples, desc=f"epoch {epoch}", unit="sample", unit_scale=True,
                leave=False, dynamic_ncols=True)


def epoch_reporter(quiet: bool, log_json: str | None) -> Callable[[EpochStats], None]:
    """Rank 0's per-epoch report: a line on stdout unless quiet, a JSON object per line.

    The first record of each run carries ``"run_start": true`` (``plot curves`` draws runs
    apart). A failed append (a full disk) never stops training, whose checkpoints matter
    more than its log: it is one ``mpinn: warning:`` line, the log is cut back to its last
    whole record, and this run logs no further epochs.
    """
    first, failed = True, False

    def report(stats: EpochStats) -> None:
        nonlocal first, failed
        if not quiet:
            print_epoch(stats)
        if not log_json or failed:
            return
        record = {**stats.record(stats.val_loss is not None), **({"run_start": True} if first else {})}
        size = None
        try:
            size = os.path.getsize(log_json) if os.path.isfile(log_json) else None
            with open(log_json, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            first = False
        except OSError as exc:
            failed = True
            if size is not None:  # no half record left for plot curves to trip on
                with suppress(OSError):
                    os.truncate(log_json, size)
            print(f"mpinn: warning: --log-json {log_json}: cannot append epoch {stats.epoch} "
                  f"({exc.strerror or exc}); training and its checkpoints go on, its later "
                  "epochs are not logged", file=sys.stderr, flush=True)
    return report


def print_epoch(stats: EpochStats) -> None:
    acc = f"  accuracy {stats.accuracy:.4f}" if stats.accuracy is not None else ""
    val = f"  val_loss {stats.val_loss:.6f}" if stats.val_loss is not None else ""
    if stats.val_accuracy is not None:
        val += f"  val_accuracy {stats.val_accuracy:.4f}"
    print(f"epoch {stats.epoch}  loss {stats.loss:.6f}{acc}{val}  "
          f"samples/s {stats.samples_per_second:,.0f}", flush=True, file=sys.stdout)
