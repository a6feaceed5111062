"""The options of the command line and the Python API, declared once: name, kind and range.

The CLI checks its flags' ranges with ``AT_LEAST``, ``MAX_SEED`` and ``FLOAT_RANGES``
(``cli.check_values``); the API checks every argument of ``Network.create``, ``open``,
``fit``, ``predict`` and ``evaluate`` against the tables of ``CALLS`` built from the same
ranges (``check``, ``check_on``), so a bad argument is one ``MpinnError`` naming the Python
parameter (``fit: epochs must be a whole number >= 0, got 1.5``), never a raw exception
from deep inside the loop. Nothing here imports numpy or MPI at import time: the CLI reads
these tables before it sets the BLAS thread count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any

from mpinn.errors import MpinnError

# the least value of each whole-number option (CLI flag or API parameter of the same name)
AT_LEAST = {"batch_size": 1, "epochs": 0, "keep": 1, "checkpoint_every": 0, "micro_batches": 1,
            "seed": 0, "ranks": 1, "neurons": 1, "layers": 1, "samples": 1, "features": 1,
            "outputs": 1, "fan_in": 1, "threads": 1, "ranks_per_node": 1, "patience": 0,
            "step_size": 1, "warmup_steps": 0, "replicas": 1}
MAX_SEED = 2**63 - 1
# each real-number option: the finite values it takes, and how a message says so
FLOAT_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: v > 0, "a positive number"),
    "collective_timeout": (lambda v: v > 0, "a positive number of seconds"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "density": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "cap": (lambda v: v > 0, "a positive number"),
    "gamma": (lambda v: v > 0, "a positive number"),
    "min_lr": (lambda v: v >= 0, "zero or more"),
    "weight_decay": (lambda v: v >= 0, "zero or more"),
    "clip_norm": (lambda v: v >= 0, "zero (off) or more"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "negative_slope": (lambda v: True, "a finite number")}


@dataclass(frozen=True)
class Option:
    """One parameter: ``kind`` (whole, number, bool, choice, text, path, sizes, callables),
    the least and most whole number (a number's range is ``FLOAT_RANGES[name]``), the
    choices of a ``choice``, whether None is allowed, and whether a list of such values
    (one per layer) is allowed too."""

    name: str
    kind: str
    least: int | None = None
    most: int | None = None
    choices: tuple[str, ...] = ()
    optional: bool = False
    per_layer: bool = False
    comma_text: bool = False  # a choice per layer may also be text "a,b,c" (storage)


# ---------------------------------------------------------------- training options

OPTIMIZERS = ("sgd", "adam", "adamw")  # optim.make_optimizer's names
# comm.exchange.PLANS's kinds (it checks that they agree), named here so that parsing the
# flags imports neither numpy nor MPI
EXCHANGES = ("auto", "alltoallv", "allgather", "collective", "neighbor", "node", "node-forward")
SCHEDULES = ("constant", "step", "cosine")  # optim.Schedule's
# kernels.ACTIVATIONS, named here for the CLI's help (tests/unit/test_kernels.py holds them equal)
ACTIVATIONS = ("identity", "relu", "relu_cap", "sigmoid", "tanh", "gelu", "silu", "leaky_relu",
               "softmax")
CONTINUED = " (default: the value the model's last run used, else {})"
NOT_RUN = object()  # ``setting(run=...)`` of an option that is not a run setting
REGULARISATION = "validation, schedules and regularisation (docs/api.md)"


def setting(default: Any, check: Callable[[str], Option] | Option, help: str, *,
            run: Any = NOT_RUN, flag: str | None = None, metavar: str | None = None,
            group: str = "", cli: bool = True) -> Any:
    """One field of ``TrainConfig``: its default, its check (``whole``, ``number``, ... or an
    ``Option``), its help text; ``run``: for a run setting (continued from the model's last
    run where not named: its default is None), the value a new model starts from; ``flag``:
    the CLI flag where it is not ``--name`` (``--no-shuffle``); ``cli=False``: API only."""
    return field(default=default, metadata={
        "check": check, "help": help, "run": run, "flag": flag, "metavar": metavar,
        "group": group, "cli": cli})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run, declared once: ``mpinn train``'s flags and the config
    file's ``[train]`` keys are made from these fields (``cli.parser``), ``Network.fit``
    takes them as keyword arguments of the same names and defaults (a test holds it to
    that), and the loop (``train.train``) reads them from here."""

    epochs: int = setting(1, lambda n: whole(n), "epochs to train; with --resume: until this "
                          "many are complete in all")
    batch_size: int = setting(64, lambda n: whole(n), "samples per step (the global batch)",
                              cli=False)  # the CLI declares it with evaluate's and predict's
    optimizer: str | None = setting(
        None, lambda n: choice(n, OPTIMIZERS, optional=True),
        "adamw: Adam with decoupled weight decay (torch AdamW)", run="sgd")
    lr: float | None = setting(None, lambda n: number(n, optional=True), "learning rate",
                               run=0.1)
    momentum: float | None = setting(None, lambda n: number(n, optional=True), "SGD momentum",
                                     run=0.0)
    seed: int = setting(0, lambda n: whole(n), "shuffling seed")
    shuffle: bool = setting(True, lambda n: flag(n), "shuffle the samples every epoch",
                            flag="--no-shuffle")
    checkpoint_every: int = setting(0, lambda n: whole(n), "also save every K epochs "
                                    "(default: only at the end)", metavar="K")
    keep: int = setting(1, lambda n: whole(n), "checkpoints to keep: the model file and K-1 "
                        "older ones in MODEL.checkpoints/ (default 1)", metavar="K")
    resume: bool = setting(False, lambda n: flag(n), "continue the stored run until --epochs "
                           "epochs are complete in all (none left: says so and exits 0)")
    micro_batches: int = setting(1, lambda n: whole(n), "run each batch as a pipeline of M "
                                 "micro-batches (GPipe); pays off when ranks own whole layers "
                                 "(--strategy layers)", metavar="M")
    patience: int = setting(0, lambda n: whole(n), "stop after K epochs without a lower "
                            "validation loss (0: never)", metavar="K", group=REGULARISATION)
    keep_best: bool = setting(False, lambda n: flag(n), "also commit each new best validation "
                              "loss to MODEL.best.h5 (m.h5 -> m.best.h5)", group=REGULARISATION)
    schedule: str | None = setting(
        None, lambda n: choice(n, SCHEDULES, optional=True), "learning rate per step: "
        "constant, step (StepLR) or cosine (CosineAnnealingLR over all the run's steps)",
        run="constant", group=REGULARISATION)
    step_size: int | None = setting(None, lambda n: whole(n, optional=True), "step schedule: "
                                    "multiply the rate by --gamma every E epochs", run=1,
                                    metavar="E", group=REGULARISATION)
    gamma: float | None = setting(None, lambda n: number(n, optional=True),
                                  "step schedule's factor", run=0.1, group=REGULARISATION)
    min_lr: float | None = setting(None, lambda n: number(n, optional=True),
                                   "cosine schedule's floor", run=0.0, group=REGULARISATION)
    warmup_steps: int | None = setting(None, lambda n: whole(n, optional=True), "scale the rate "
                                       "by (t+1)/W over the first W steps", run=0, metavar="W",
                                       group=REGULARISATION)
    weight_decay: float | None = setting(None, lambda n: number(n, optional=True), "L2 added to "
                                         "the gradient (sgd, adam); decoupled for adamw", run=0.0,
                                         metavar="WD", group=REGULARISATION)
    clip_norm: float | None = setting(None, lambda n: number(n, optional=True), "clip the global "
                                      "gradient norm over all ranks to C (0: off)", run=0.0,
                                      metavar="C", group=REGULARISATION)
    dropout: float | None = setting(None, lambda n: number(n, optional=True), "inverted dropout "
                                    "on hidden layers while training; the same masks at any "
                                    "rank count (default: the last run's --dropout, else the "
                                    "rates the model file stores, set by init --dropout or "
                                    "import-torch; 0 turns them off)", run=None, metavar="P",
                                    group=REGULARISATION)
    reset_optimizer: bool = setting(False, lambda n: flag(n), "start the optimizer afresh: drop "
                                    "the state (Adam's moments, momentum) the model holds, and "
                                    "take the optimizer's settings from the flags and defaults, "
                                    "not the model; needed to change --optimizer")
    progress: bool = setting(False, lambda n: flag(n), "show a progress bar even when stderr is "
                             "not a terminal (under mpirun the ranks' stderr never is)")
    log_json: str | None = setting(None, Option("log_json", "path", optional=True),
                                   "append one JSON object per epoch to FILE (rank 0)",
                                   metavar="FILE")
    trace: str | None = setting(None, Option("trace", "path", optional=True),
                                "write the run's timeline to FILE: one Chrome trace (open it "
                                "in ui.perfetto.dev or chrome://tracing) of every rank's "
                                "compute, pack, wait, optimizer and checkpoint spans per layer "
                                "and step, and each exchange in flight, clocks aligned "
                                "(docs/scaling.md)", metavar="FILE")
    verbose: bool = setting(False, lambda n: flag(n), "print an epoch line on rank 0",
                            cli=False)  # the CLI's --quiet
    force: bool = setting(False, lambda n: flag(n), "replace an existing --trace or "
                          "MODEL.best.h5 of another model", cli=False)  # the CLI's --force

    def named_run(self) -> dict[str, Any]:
        """The run settings as given, None where not named (``train.resolve_run``)."""
        return {name: getattr(self, name) for name in RUN_DEFAULTS}


def seconds_from_env(name: str, default: float, most: float = math.inf) -> float:
    """A positive number of seconds, at most ``most``, from the environment variable ``name``
    (``default`` where it is unset or empty); anything else is refused, naming the variable."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= most):
        bound = "" if math.isinf(most) else f" up to {most:g}"
        raise MpinnError(f"{name} must be a positive number of seconds{bound}, got {text!r}")
    return value


def training_fields() -> tuple[Any, ...]:
    """The fields of ``TrainConfig``, each with its ``metadata`` (``setting``)."""
    return fields(TrainConfig)


def option_of(f: Any) -> Option:
    check = f.metadata["check"]
    return check if isinstance(check, Option) else check(f.name)


# the run settings: continued from the model's last run where not named
RUN_DEFAULTS: dict[str, Any] = {f.name: f.metadata["run"] for f in fields(TrainConfig)
                                if f.metadata["run"] is not NOT_RUN}


def whole(name: str, optional: bool = False) -> Option:
    """A whole number from ``AT_LEAST[name]`` up (a seed up to ``MAX_SEED``)."""
    most = MAX_SEED if name == "seed" else None
    return Option(name, "whole", AT_LEAST[name], most, optional=optional)


def number(name: str, optional: bool = False, per_layer: bool = False) -> Option:
    """A finite real number inside ``FLOAT_RANGES[name]``."""
    return Option(name, "number", optional=optional, per_layer=per_layer)


def flag(name: str) -> Option:
    return Option(name, "bool")


def choice(name: str, choices: tuple[str, ...], optional: bool = False,
           per_layer: bool = False, comma_text: bool = False) -> Option:
    return Option(name, "choice", choices=choices, optional=optional, per_layer=per_layer,
                  comma_text=comma_text)


@cache
def calls() -> dict[str, tuple[Option, ...]]:
    """The parameters of each API call that can be checked alone (the data and the
    partition's parameters are checked where they are read)."""
    from mpinn.io.schema import DTYPES, STORAGES
    from mpinn.kernels import ACTIVATIONS
    from mpinn.partition.strategies import STRATEGIES

    hidden = tuple(a for a in ACTIVATIONS if a != "softmax")
    batch = Option("batch_size", "whole", AT_LEAST["batch_size"], optional=True)
    return {
        "create": (Option("path", "path"), Option("sizes", "sizes"),
                   choice("activation", hidden, per_layer=True), choice("output", ACTIVATIONS),
                   whole("seed"), choice("storage", STORAGES, per_layer=True, comma_text=True),
                   whole("fan_in", optional=True), number("density", optional=True),
                   number("cap", optional=True), number("negative_slope"),
                   number("dropout", per_layer=True), choice("dtype", tuple(DTYPES)),
                   flag("force")),
        "open": (Option("path", "path"), choice("strategy", STRATEGIES, optional=True),
                 Option("partition", "text", optional=True),
                 choice("dtype", tuple(DTYPES), optional=True), whole("replicas"),
                 choice("exchange", EXCHANGES)),
        # the run settings may be None: not named, the model's last run goes on with its own
        # (train.resolve_run)
        "fit": (*(option_of(f) for f in training_fields()), Option("callbacks", "callables")),
        "predict": (batch,),
        "evaluate": (batch,),
    }


def check(call: str, values: dict[str, Any]) -> None:
    """Raise ``MpinnError`` naming the first parameter of ``call`` whose value in ``values``
    has the wrong type or range; names not in the call's table are not looked at."""
    for option in calls()[call]:
        if option.name in values:
            problem = _problem(option, values[option.name])
            if problem is not None:
                raise MpinnError(f"{call}: {option.name} must be {problem}, got "
                                 f"{_shown(values[option.name])}")


def check_on(comm: Any, call: str, values: dict[str, Any]) -> None:
    """``check`` on every rank of ``comm`` (None: ``MPI.COMM_WORLD``), with the same
    ``MpinnError`` on every rank if any rank's arguments are bad (``comm.collectives.agree``).

    It is a collective: a method of a ``Network`` calls it once the model is loaded
    (``self.model``), never before, since the load is lazy and may have begun on one rank
    alone (the CLI reads ``partition_text`` on rank 0): an allgather placed before it on
    the other ranks would be matched against the load's own collectives and hang."""
    from mpi4py import MPI

    from mpinn.comm.collectives import agree

    if comm is not None and not isinstance(comm, MPI.Comm):
        # no collective can run on it: every rank was given such a thing and raises alone
        raise MpinnError(f"{call}: comm must be an mpi4py communicator or None, got "
                         f"{_shown(comm)}")
    agree(comm if comm is not None else MPI.COMM_WORLD, lambda: check(call, values))


def _problem(option: Option, value: Any) -> str | None:
    """What ``value`` must be, if it is not a good value of ``option``; else None."""
    import numpy as np

    if value is None and option.optional:
        return None
    if option.per_layer and isinstance(value, (list, tuple, np.ndarray)):
        single = Option(option.name, option.kind, option.least, option.most, option.choices)
        if all(_problem(single, item) is None for item in value):
            return None
        return f"{_wanted(single)}, or a list of such, one per layer"
    return None if GOOD[option.kind](option, value) else _wanted(option)


def _good_whole(option: Option, value: Any) -> bool:
    return _is_whole(value) and value >= (option.least or 0) and (
        option.most is None or value <= option.most)


def _good_number(option: Option, value: Any) -> bool:
    return _is_real(value) and math.isfinite(value) and FLOAT_RANGES[option.name][0](value)


def _good_bool(_option: Option, value: Any) -> bool:
    import numpy as np
    return isinstance(value, (bool, np.bool_))


def _good_choice(option: Option, value: Any) -> bool:
    items = ([v.strip() for v in value.split(",")] if option.comma_text and isinstance(value, str)
             else [value])
    return all(isinstance(v, str) and v in option.choices for v in items)


def _good_sizes(_option: Option, value: Any) -> bool:
    import numpy as np
    if isinstance(value, str):
        try:
            layers = [int(v) for v in value.split(",")]
        except ValueError:
            return False
    elif isinstance(value, (list, tuple, np.ndarray)):
        layers = list(value)
    else:
        return False
    return len(layers) >= 2 and all(_is_whole(v) and v >= 1 for v in layers)


def _good_callables(_option: Option, value: Any) -> bool:
    """A list or other iterable of callables; one callable alone or text is a mistake."""
    if callable(value) or isinstance(value, (str, bytes)):
        return False
    return not isinstance(value, (list, tuple)) or all(callable(v) for v in value)


GOOD: dict[str, Callable[[Option, Any], bool]] = {
    "whole": _good_whole, "number": _good_number, "bool": _good_bool, "choice": _good_choice,
    "text": lambda _o, v: isinstance(v, str), "path": lambda _o, v: isinstance(v, (str, os.PathLike)),
    "sizes": _good_sizes, "callables": _good_callables}


def _wanted(option: Option) -> str:
    if option.kind == "whole":
        most = f" and <= {option.most}" if option.most is not None else ""
        text = f"a whole number >= {option.least}{most}"
    elif option.kind == "number":
        text = FLOAT_RANGES[option.name][1]  # the CLI's words: "a positive number", "in [0, 1)"
    elif option.kind == "bool":
        text = "True or False"
    elif option.kind == "choice":
        text = f"one of {', '.join(option.choices)}"
    elif option.kind == "text":
        text = "text"
    elif option.kind == "path":
        text = "a file path (str or os.PathLike)"
    elif option.kind == "sizes":
        text = "at least two whole numbers >= 1 (a list, or text like \"64,32,10\")"
    else:
        text = "a list of callables (each takes an epoch's dict)"
    return f"{text} (or None)" if option.optional else text


def _is_whole(value: Any) -> bool:
    """An int or numpy integer: not a bool (True is no epoch count), not 1.0 or 1.5."""
    import numpy as np
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    import numpy as np
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _shown(value: Any) -> str:
    """A value as a message shows it: short, with its type where repr does not show it."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if isinstance(value, (int, float, str, bool)) or value is None else \
        f"{text} ({type(value).__name__})"
