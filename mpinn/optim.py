"""Optimizers that update a shard's own rows (SGD with momentum, Adam, AdamW) and the
learning-rate schedules that drive them, as torch.optim does.

Each rank updates only the rows it owns with gradients it computed itself, so no gradient
is ever reduced across ranks (gradient clipping reduces one number: the global norm).
Optimizer state lives beside the rows and is saved with them; a schedule is a pure
function of the step count, which is saved too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mpinn.config import OPTIMIZERS, SCHEDULES
from mpinn.errors import MpinnError
from mpinn.kernels import axpy


class Optimizer:
    """Base: a list of (parameter, gradient) pairs and named state slots shaped like them."""

    name = ""
    slots: tuple[str, ...] = ()

    def __init__(self, params: list[tuple[np.ndarray, np.ndarray]], lr: float,
                 weight_decay: float = 0.0) -> None:
        if not np.isfinite(lr) or lr <= 0:
            raise MpinnError(f"--lr must be a positive number, got {lr}")
        if not np.isfinite(weight_decay) or weight_decay < 0:
            raise MpinnError(f"--weight-decay must be a non-negative number, got {weight_decay}")
        self.params = params
        self.lr = lr  # the rate of the next step: a schedule sets it before each one
        self.weight_decay = weight_decay
        self.state = {slot: [np.zeros_like(p) for p, _ in params] for slot in self.slots}

    def config(self) -> dict[str, Any]:
        """What is saved in the file's training state besides the slot arrays."""
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay}

    def _decay_into_gradient(self, param: np.ndarray, grad: np.ndarray) -> None:
        """L2 regularisation as torch's SGD and Adam apply it: g += weight_decay * w."""
        if self.weight_decay:
            axpy(self.weight_decay, param, grad)

    def restore(self, config: dict[str, Any]) -> None:
        """Take back the counters saved by ``config`` (the slot arrays are restored by the caller)."""

    def step(self) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: ``g += wd w; v = momentum * v + g; w -= lr * v`` (plain SGD when
    momentum is 0).

    Parameters
    ----------
    params : list of (parameter, gradient) numpy array pairs
        Updated in place by ``step``; the gradients are read.
    lr : float
        Learning rate, > 0 (a ``Schedule`` may set ``self.lr`` before each step).
    momentum : float
        In [0, 1); 0 is plain SGD.
    weight_decay : float
        L2 added to the gradient, >= 0.

    Raises
    ------
    MpinnError
        A rate, momentum or decay out of its range.
    """

    name = "sgd"

    def __init__(self, params: list[tuple[np.ndarray, np.ndarray]], lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if not 0 <= momentum < 1:
            raise MpinnError(f"--momentum must be in [0, 1), got {momentum}")
        self.slots = ("momentum",) if momentum else ()
        super().__init__(params, lr, weight_decay)
        self.momentum = momentum

    def config(self) -> dict[str, Any]:
        return {**super().config(), "momentum": self.momentum}

    @property
    def plain(self) -> bool:
        """Whether the step is ``w -= lr g`` alone (no momentum, no weight decay), which the
        engine can take inside backward (``Engine.backward(sgd_lr=...)``)."""
        return not self.momentum and not self.weight_decay

    def step(self) -> None:
        # in place, no temporaries: the gradient buffers are rewritten by the next backward
        for i, (param, grad) in enumerate(self.params):
            self._decay_into_gradient(param, grad)
            if self.momentum:
                velocity = self.state["momentum"][i]
                velocity *= self.momentum
                velocity += grad
                axpy(-self.lr, velocity, param)
            else:
                axpy(-self.lr, grad, param)


def steps_in_backward(plain_sgd: bool, replicas: int, micro_batches: int,
                      clip_norm: float = 0.0) -> bool:
    """Whether ``train`` takes the step inside backward, in the weight-gradient GEMMs
    (``Engine.backward(sgd_lr=...)``): plain SGD with nothing between the gradients and the
    step (no sum over replicas, no clipping, one micro-batch). The cost model asks the same
    of its layouts, which it trains with plain SGD."""
    return plain_sgd and not clip_norm and replicas == 1 and micro_batches == 1


class Adam(Optimizer):
    """torch.optim.Adam (Kingma & Ba, bias-corrected), betas (0.9, 0.999), eps 1e-8; weight
    decay as L2 in the gradient (``g += wd w``), as torch's Adam.

    Parameters
    ----------
    params : list of (parameter, gradient) numpy array pairs
        Updated in place by ``step``; the moments ``m`` and ``v`` are kept per parameter.
    lr : float
        Learning rate, > 0.
    weight_decay : float
        >= 0: L2 in the gradient (Adam), or decoupled (AdamW).
    beta1, beta2, eps : float
        torch's defaults.

    Raises
    ------
    MpinnError
        A rate or decay out of its range.
    """

    name = "adam"
    slots = ("m", "v")

    def __init__(self, params: list[tuple[np.ndarray, np.ndarray]], lr: float,
                 weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        super().__init__(params, lr, weight_decay)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.t = 0

    def config(self) -> dict[str, Any]:
        return {**super().config(), "betas": [self.beta1, self.beta2], "eps": self.eps, "t": self.t}

    def restore(self, config: dict[str, Any]) -> None:
        self.t = int(config.get("t", 0))

    def step(self) -> None:
        self.t += 1
        correction1 = 1 - self.beta1 ** self.t
        correction2 = 1 - self.beta2 ** self.t
        step_size = self.lr / correction1
        root2 = np.sqrt(correction2)
        # in place: the gradient buffer serves as scratch once m and v have taken it in
        for i, (param, grad) in enumerate(self.params):
            self._decay(param, grad)
            m, v = self.state["m"][i], self.state["v"][i]
            m *= self.beta1
            m += (1 - self.beta1) * grad
            v *= self.beta2
            grad *= grad
            grad *= 1 - self.beta2
            v += grad
            np.sqrt(v, out=grad)
            grad /= root2
            grad += self.eps
            np.divide(m, grad, out=grad)
            grad *= -step_size
            param += grad


    def _decay(self, param: np.ndarray, grad: np.ndarray) -> None:
        self._decay_into_gradient(param, grad)


class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay, ``w *= 1 - lr wd``, then Adam's step."""

    name = "adamw"

    def _decay(self, param: np.ndarray, grad: np.ndarray) -> None:
        if self.weight_decay:
            param *= 1 - self.lr * self.weight_decay


# every optimizer by its name in config.OPTIMIZERS (the names the CLI and the file use)
OPTIMIZER_CLASSES: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
if tuple(OPTIMIZER_CLASSES) != OPTIMIZERS:
    raise ImportError("optim.OPTIMIZER_CLASSES and config.OPTIMIZERS name different optimizers")


def make_optimizer(name: str, params: list[tuple[np.ndarray, np.ndarray]], lr: float,
                   momentum: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """The optimizer named on the command line (``OPTIMIZER_CLASSES``)."""
    if name not in OPTIMIZER_CLASSES:
        raise MpinnError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
    if momentum and name != "sgd":
        raise MpinnError("--momentum applies to --optimizer sgd only")
    if name == "sgd":
        return SGD(params, lr, momentum, weight_decay)
    return OPTIMIZER_CLASSES[name](params, lr, weight_decay)


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch's ``clip_grad_norm_`` factor for gradients of global L2 norm ``norm``:
    max_norm / (norm + 1e-6), at most 1 (gradients are always multiplied by it)."""
    return min(max_norm / (norm + 1e-6), 1.0)


@dataclass(frozen=True)
class Schedule:
    """A learning rate per optimizer step, counted over the whole run (a pure function).

    ``constant``: ``lr``. ``step``: ``lr * gamma ** ((epoch - 1) // step_size)``, torch's
    ``StepLR`` stepped once per epoch. ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi t /
    t_max)) / 2`` at step t (from 0), torch's ``CosineAnnealingLR`` stepped once per batch
    with ``T_max`` = ``t_max``, the run's optimizer steps. ``warmup_steps`` W multiplies the
    rate of steps t < W by (t + 1) / W. Saved with the training state, so a resumed run
    continues it exactly.

    Raises
    ------
    MpinnError
        An unknown ``name``, or a step size, gamma, floor or warm-up out of its range.
    """

    name: str = "constant"
    lr: float = 0.1
    step_size: int = 1
    gamma: float = 0.1
    min_lr: float = 0.0
    warmup_steps: int = 0
    t_max: int = 1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise MpinnError(f"unknown schedule {self.name!r} (known: {', '.join(SCHEDULES)})")
        if isinstance(self.step_size, bool) or int(self.step_size) != self.step_size \
                or self.step_size < 1:
            raise MpinnError(f"--step-size must be a whole number of epochs >= 1, got "
                             f"{self.step_size}")
        if not np.isfinite(self.gamma) or self.gamma <= 0:
            raise MpinnError(f"--gamma must be a positive number, got {self.gamma}")
        if not np.isfinite(self.min_lr) or not 0 <= self.min_lr <= self.lr:
            raise MpinnError(f"--min-lr must be in [0, --lr], got {self.min_lr}")
        if isinstance(self.warmup_steps, bool) or int(self.warmup_steps) != self.warmup_steps \
                or self.warmup_steps < 0:
            raise MpinnError(f"--warmup-steps must be a whole number >= 0, got "
                             f"{self.warmup_steps}")

    def rate(self, step: int, epoch: int) -> float:
        """The rate of optimizer step ``step`` (from 0), taken in epoch ``epoch`` (from 1)."""
        if self.name == "step":
            rate = self.lr * self.gamma ** ((epoch - 1) // self.step_size)
        elif self.name == "cosine":
            rate = self.min_lr + (self.lr - self.min_lr) * (
                1 + math.cos(math.pi * step / max(self.t_max, 1))) / 2
        else:
            rate = self.lr
        if step < self.warmup_steps:
            rate *= (step + 1) / self.warmup_steps
        return rate

    def config(self) -> dict[str, Any]:
        """What the file records of the schedule. T_max only where it sets the rates (cosine):
        a constant run's checkpoint must not depend on how many epochs it was asked for."""
        record = asdict(self)
        if self.name != "cosine":
            del record["t_max"]
        return record
