"""A plain single-process numpy computation of an mpinn model: the yardstick for every test.

Written independently of the engine (batch-major, whole weight matrices, no plans), so a
distributed result that equals it is right for the right reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h5py
import numpy as np
import scipy.sparse as sp
from scipy.special import erf


@dataclass
class Reference:
    weights: list  # dense arrays, or scipy CSR matrices for CSR layers
    biases: list[np.ndarray]
    activations: list[str]
    caps: list[float | None] = field(default_factory=list)
    state: dict[str, list[np.ndarray]] = field(default_factory=dict)
    t: int = 0
    masks: list[np.ndarray] | None = None  # dropout masks of the hidden layers, (batch, n)

    @classmethod
    def from_file(cls, path: str) -> Reference:
        with h5py.File(path, "r") as f:
            sizes = f.attrs["sizes"]
            layers = [f["layers"][str(i)] for i in range(1, len(sizes))]
            weights = [sp.csr_matrix((ly["data"][...], ly["indices"][...], ly["indptr"][...]),
                                     shape=(sizes[i + 1], sizes[i]))
                       if ly.attrs["storage"] == "csr" else ly["weight"][...]
                       for i, ly in enumerate(layers)]
            return cls(weights, [ly["bias"][...] for ly in layers],
                       [str(ly.attrs["activation"]) for ly in layers],
                       # the activation's one parameter: relu_cap's cap, leaky_relu's slope
                       [float(ly.attrs["cap"]) if "cap" in ly.attrs
                        else float(ly.attrs["negative_slope"]) if "negative_slope" in ly.attrs
                        else None for ly in layers])

    def forward(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Pre-activations and activations of every layer for x (batch, n0); as[0] is x."""
        zs, acts = [], [x]
        for i, (w, b, act) in enumerate(zip(self.weights, self.biases, self.activations, strict=True)):
            z = np.asarray(w @ acts[-1].T).T + b  # scipy.sparse for CSR layers
            zs.append(z)
            a = apply(act, z, self.cap(i))
            if self.masks is not None and i < len(self.weights) - 1:
                a = a * self.masks[i]  # the next layer reads the dropped activations
            acts.append(a)
        return zs, acts

    def cap(self, i: int) -> float | None:
        return self.caps[i] if self.caps else None

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list, list]:
        """Mean loss and gradients of all weights and biases for one batch."""
        zs, acts = self.forward(x)
        out, batch = acts[-1], x.shape[0]
        labels = y.ndim == 1
        if labels and self.activations[-1] == "softmax":
            p = out
            loss = -np.log(p[np.arange(batch), y]).sum() / batch
            onehot = np.eye(out.shape[1], dtype=out.dtype)[y]
            dz = (p - onehot) / batch
        elif self.activations[-1] == "softmax":  # float targets: soft-label cross-entropy
            p = out
            loss = -(y * np.log(p)).sum() / batch
            dz = (p - y) / batch
        else:
            target = np.eye(out.shape[1], dtype=out.dtype)[y] if labels else y
            loss = 0.5 * ((out - target) ** 2).sum() / batch
            da = (out - target) / batch
            dz = da * derivative(self.activations[-1], zs[-1], out, self.cap(len(zs) - 1))
        gw, gb = [None] * len(zs), [None] * len(zs)
        for i in range(len(zs) - 1, -1, -1):
            w = self.weights[i]
            full = dz.T @ acts[i]
            if sp.issparse(w):  # only the stored connections have parameters
                rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
                gw[i] = full[rows, w.indices]
            else:
                gw[i] = full
            gb[i] = dz.sum(axis=0)
            if i:
                da = np.asarray(w.T @ dz.T).T
                below = acts[i]
                if self.masks is not None:  # through the mask, then the activation
                    da = da * self.masks[i - 1]
                    below = apply(self.activations[i - 1], zs[i - 1], self.cap(i - 1))
                dz = da * derivative(self.activations[i - 1], zs[i - 1], below, self.cap(i - 1))
        return float(loss), gw, gb

    def parameters(self) -> list[np.ndarray]:
        """Weights (a CSR layer's stored values) then biases, as arrays updated in place."""
        return [w.data if sp.issparse(w) else w for w in self.weights] + self.biases

    def step(self, gw: list, gb: list, optimizer: str, lr: float, momentum: float) -> None:
        params = self.parameters()
        grads = gw + gb
        if optimizer == "sgd":
            if momentum:
                vel = self.state.setdefault("v", [np.zeros_like(p) for p in params])
                for i, g in enumerate(grads):
                    vel[i] = momentum * vel[i] + g
                    params[i] -= lr * vel[i]
            else:
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g
        else:
            m = self.state.setdefault("m", [np.zeros_like(p) for p in params])
            v = self.state.setdefault("v", [np.zeros_like(p) for p in params])
            self.t += 1
            b1, b2, eps = 0.9, 0.999, 1e-8
            for i, g in enumerate(grads):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                mhat = m[i] / (1 - b1 ** self.t)
                vhat = v[i] / (1 - b2 ** self.t)
                params[i] -= lr * mhat / (np.sqrt(vhat) + eps)

    def train(self, x: np.ndarray, y: np.ndarray, epochs: int, batch: int, lr: float,
              optimizer: str = "sgd", momentum: float = 0.0, seed: int = 0,
              shuffle: bool = True, first_epoch: int = 1, dropout: float = 0.0) -> list[float]:
        """Mean loss per epoch. ``dropout``: masks from ``kernels.dropout_mask`` (the
        definition of which neuron is dropped when), applied here batch-major."""
        from mpinn.kernels import dropout_mask
        sizes = [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]
        first_gid = np.cumsum([0] + sizes)
        steps = 0
        losses = []
        for epoch in range(first_epoch, first_epoch + epochs):
            order = (np.random.default_rng([seed, epoch]).permutation(len(x)) if shuffle
                     else np.arange(len(x)))
            total = 0.0
            for start in range(0, len(x), batch):
                idx = order[start:start + batch]
                if dropout:
                    self.masks = [dropout_mask(seed, steps, first_gid[layer] + np.arange(n), idx,
                                               dropout, np.empty((n, idx.size), x.dtype)).T
                                  for layer, n in enumerate(sizes[1:-1], start=1)]
                loss, gw, gb = self.loss_and_grads(x[idx], y[idx])
                self.masks = None
                total += loss * len(idx)
                self.step(gw, gb, optimizer, lr, momentum)
                steps += 1
            losses.append(total / len(x))
        return losses


def apply(act: str, z: np.ndarray, cap: float | None = None) -> np.ndarray:
    if act == "identity":
        return z.copy()
    if act == "relu":
        return np.maximum(z, 0)
    if act == "relu_cap":
        return np.minimum(np.maximum(z, 0), cap)
    if act == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if act == "tanh":
        return np.tanh(z)
    if act == "gelu":
        return 0.5 * z * (1 + erf(z / np.sqrt(2)))
    if act == "silu":
        return z / (1 + np.exp(-z))
    if act == "leaky_relu":
        return np.where(z > 0, z, (0.01 if cap is None else cap) * z)
    if act == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(act)


def derivative(act: str, z: np.ndarray, a: np.ndarray, cap: float | None = None) -> np.ndarray:
    if act == "identity":
        return np.ones_like(z)
    if act == "relu":
        return (z > 0).astype(z.dtype)
    if act == "relu_cap":
        return ((z > 0) & (z < cap)).astype(z.dtype)
    if act == "sigmoid":
        return a * (1 - a)
    if act == "tanh":
        return 1 - a * a
    if act == "gelu":
        return 0.5 * (1 + erf(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    if act == "silu":
        s = 1 / (1 + np.exp(-z))
        return s * (1 + z * (1 - s))
    if act == "leaky_relu":
        return np.where(z > 0, 1.0, 0.01 if cap is None else cap).astype(z.dtype)
    raise ValueError(act)


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype: str | np.dtype,
                 what: str = "") -> None:
    """Equal within 1e-5 (float32) or 1e-10 (float64), relative to the largest expected entry."""
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-10
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    err = np.abs(actual - expected).max(initial=0.0) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
