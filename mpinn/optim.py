"""Optimizers that update a shard's own rows: SGD with momentum and Adam, as torch.optim does.

Each rank updates only the rows it owns with gradients it computed itself, so no gradient
is ever reduced across ranks. Optimizer state lives beside the rows and is saved with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpinn.errors import MpinnError

OPTIMIZERS = ("sgd", "adam")


class Optimizer:
    """Base: a list of (parameter, gradient) pairs and named state slots shaped like them."""

    name = ""
    slots: tuple[str, ...] = ()

    def __init__(self, params: list[tuple[np.ndarray, np.ndarray]], lr: float) -> None:
        if not np.isfinite(lr) or lr <= 0:
            raise MpinnError(f"--lr must be a positive number, got {lr}")
        self.params = params
        self.lr = lr
        self.state = {slot: [np.zeros_like(p) for p, _ in params] for slot in self.slots}

    def config(self) -> dict[str, Any]:
        """What is saved in the file's training state besides the slot arrays."""
        return {"name": self.name, "lr": self.lr}

    def restore(self, config: dict[str, Any]) -> None:
        """Take back the counters saved by ``config`` (the slot arrays are restored by the caller)."""

    def step(self) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: v = momentum * v + g; w -= lr * v (plain SGD when momentum is 0)."""

    name = "sgd"

    def __init__(self, params: list[tuple[np.ndarray, np.ndarray]], lr: float,
                 momentum: float = 0.0) -> None:
        if not 0 <= momentum < 1:
            raise MpinnError(f"--momentum must be in [0, 1), got {momentum}")
        self.slots = ("momentum",) if momentum else ()
        super().__init__(params, lr)
        self.momentum = momentum

    def config(self) -> dict[str, Any]:
        return {**super().config(), "momentum": self.momentum}

    def step(self) -> None:
        # in place, no temporaries: the gradient buffers are rewritten by the next backward
        for i, (param, grad) in enumerate(self.params):
            if self.momentum:
                velocity = self.state["momentum"][i]
                velocity *= self.momentum
                velocity += grad
                np.multiply(velocity, -self.lr, out=grad)
            else:
                grad *= -self.lr
            param += grad


class Adam(Optimizer):
    """torch.optim.Adam (Kingma & Ba, bias-corrected), betas (0.9, 0.999), eps 1e-8."""

    name = "adam"
    slots = ("m", "v")

    def __init__(self, params: list[tuple[np.ndarray, np.ndarray]], lr: float,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(params, lr)
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


def make_optimizer(name: str, params: list[tuple[np.ndarray, np.ndarray]], lr: float,
                   momentum: float = 0.0) -> Optimizer:
    """The optimizer named on the command line."""
    if name == "sgd":
        return SGD(params, lr, momentum)
    if name == "adam":
        if momentum:
            raise MpinnError("--momentum applies to --optimizer sgd only")
        return Adam(params, lr)
    raise MpinnError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
