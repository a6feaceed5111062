"""Forward and backward over the layers, SPMD, from a shard, its exchange plans and kernels.

Every rank runs the same sequence: for each layer, gather the inputs its rows read
(``plan.forward``), compute its rows, and in backward send the partial sums of the inputs
back to their owners (``plan.backward``). A softmax output split over ranks uses the
global max and sum; the loss and accuracy are reduced the same way. The engine never
calls MPI itself: every message goes through exchange.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpinn import kernels
from mpinn.errors import inject_fault
from mpinn.exchange import MAX, MIN, SUM, ExchangePlan, allreduce
from mpinn.shard import LayerShard, Shard


@dataclass
class BatchResult:
    """Loss summed over the batch's samples (all ranks' shares) and correctly classified count."""

    loss_sum: float
    correct: int


class Engine:
    """Runs batches through one rank's shard; plans and work buffers are built once."""

    def __init__(self, shard: Shard, comm: MPI.Comm, max_batch: int) -> None:
        self.shard = shard
        self.comm = comm
        self.max_batch = max_batch
        dtype = shard.spec.dtype
        self.plans = [ExchangePlan(comm, shard.table, s.spec.index, s.inputs, max_batch, dtype)
                      for s in shard.layers]
        self.z = [np.empty(s.rows.size * max_batch, dtype) for s in shard.layers]
        self.a = [np.empty(s.rows.size * max_batch, dtype) for s in shard.layers]
        self.grad_z = [np.empty(s.rows.size * max_batch, dtype) for s in shard.layers]
        self.grad_inputs = [np.empty(s.inputs.size * max_batch, dtype) for s in shard.layers]
        self.grad_weight = [np.zeros_like(s.weight) for s in shard.layers]
        self.grad_bias = [np.zeros_like(s.bias) for s in shard.layers]
        self.inputs: list[np.ndarray] = []
        self.output_rows = shard.layers[-1].rows
        self.softmax = shard.layers[-1].spec.activation == "softmax"
        self._max = np.empty(max_batch, dtype)
        self._sum = np.empty(max_batch, dtype)
        self._batch = 0
        self.seconds_compute = 0.0  # GEMMs and elementwise kernels, for the benchmarks

    def _buf(self, flat: np.ndarray, rows: int, batch: int) -> np.ndarray:
        return flat[: rows * batch].reshape(rows, batch)

    # ------------------------------------------------------------ forward

    def forward(self, x_local: np.ndarray) -> np.ndarray:
        """Outputs of my output rows, (rows, batch), from my owned input features (n, batch)."""
        inject_fault("step", self.comm.rank)
        batch = x_local.shape[1]
        self._batch = batch
        self.inputs = []
        activations = x_local
        last = len(self.shard.layers) - 1
        for i, (layer, plan) in enumerate(zip(self.shard.layers, self.plans, strict=True)):
            gathered = plan.start_forward(activations)
            self.inputs.append(gathered)
            z = self._buf(self.z[i], layer.rows.size, batch)
            a = self._buf(self.a[i], layer.rows.size, batch)
            local, remote = slice(0, plan.n_own_inputs), slice(plan.n_own_inputs, None)
            started = time.perf_counter()
            kernels.block_forward(layer.weight, gathered, local, z, accumulate=False)
            self.seconds_compute += time.perf_counter() - started
            plan.finish_forward()
            started = time.perf_counter()
            kernels.block_forward(layer.weight, gathered, remote, z, accumulate=True)
            z += layer.bias[:, None]
            if i == last and self.softmax:
                self._softmax(z, a)
            else:
                kernels.activate(layer.spec.activation, z, out=a)
            self.seconds_compute += time.perf_counter() - started
            activations = a
        return activations

    def _softmax(self, z: np.ndarray, out: np.ndarray) -> None:
        """Softmax over output neurons spread across ranks: global max, then global sum."""
        batch = z.shape[1]
        gmax = self._max[:batch]
        if z.shape[0]:
            np.max(z, axis=0, out=gmax)
        else:
            gmax.fill(-np.inf)
        allreduce(self.comm, gmax, MAX)
        kernels.softmax_shifted_exp(z, gmax, out)
        gsum = self._sum[:batch]
        np.sum(out, axis=0, out=gsum)
        allreduce(self.comm, gsum, SUM)
        out /= gsum[None, :]

    def predicted_class(self, outputs: np.ndarray) -> np.ndarray:
        """Index of the largest output per sample, lowest index on ties, over all ranks."""
        batch = outputs.shape[1]
        if self.softmax:
            gmax = self._max[:batch]  # softmax already reduced max(z); argmax z == argmax p
            values = self._buf(self.z[-1], self.output_rows.size, batch)
        else:
            gmax = self._max[:batch]
            if outputs.shape[0]:
                np.max(outputs, axis=0, out=gmax)
            else:
                gmax.fill(-np.inf)
            allreduce(self.comm, gmax, MAX)
            values = outputs
        big = np.iinfo(np.int64).max
        candidate = np.where(values == gmax[None, :], self.output_rows[:, None], big)
        best = candidate.min(axis=0) if candidate.shape[0] else np.full(batch, big)
        return allreduce(self.comm, np.ascontiguousarray(best, dtype=np.int64), MIN)

    # ------------------------------------------------------------ loss

    def loss_and_grad(self, outputs: np.ndarray, labels: np.ndarray | None,
                      targets: np.ndarray | None) -> BatchResult:
        """Loss of the batch and dL/dz of my output rows (stored for ``backward``).

        Softmax with integer labels: mean cross-entropy. Otherwise (1/2B) * sum of squared
        errors against ``targets`` (my output rows, neuron-major) or one-hot ``labels``.
        """
        batch = outputs.shape[1]
        layer = self.shard.layers[-1]
        z = self._buf(self.z[-1], layer.rows.size, batch)
        grad = self._buf(self.grad_z[-1], layer.rows.size, batch)
        correct = 0
        if labels is not None:
            hits = kernels.label_hits(self.output_rows, labels)
            correct = int(np.count_nonzero(self.predicted_class(outputs) == labels))
        if labels is not None and self.softmax:
            log_sum = np.log(self._sum[:batch])
            loss = kernels.cross_entropy_local(z, self._max[:batch], log_sum, hits)
            np.subtract(outputs, hits, out=grad)
            grad /= batch
        else:
            target = hits.astype(outputs.dtype) if labels is not None else targets
            loss = kernels.squared_error_local(outputs, target)
            np.subtract(outputs, target, out=grad)
            grad /= batch
            if self.softmax:
                # softmax Jacobian: dz_i = p_i (g_i - sum_j p_j g_j), the sum over all ranks
                dot = np.einsum("ij,ij->j", outputs, grad)
                allreduce(self.comm, dot, SUM)
                grad -= dot[None, :]
                grad *= outputs
            else:
                kernels.activation_grad(layer.spec.activation, z, outputs, grad)
        if inject_fault("nan", self.comm.rank):
            loss = float("nan")
        return BatchResult(loss, correct)

    # ------------------------------------------------------------ backward

    def backward(self) -> None:
        """Gradients of my rows for the last forward, from the output dL/dz of ``loss_and_grad``."""
        batch = self._batch
        layers = self.shard.layers
        for i in range(len(layers) - 1, -1, -1):
            layer: LayerShard = layers[i]
            plan = self.plans[i]
            grad_z = self._buf(self.grad_z[i], layer.rows.size, batch)
            started = time.perf_counter()
            if i > 0:
                # remote partial sums first, so they travel while the rest is computed
                grad_inputs = self._buf(self.grad_inputs[i], layer.inputs.size, batch)
                local, remote = slice(0, plan.n_own_inputs), slice(plan.n_own_inputs, None)
                kernels.block_input_grad(layer.weight, grad_z, remote, grad_inputs)
                self.seconds_compute += time.perf_counter() - started
                plan.start_backward(grad_inputs)
                started = time.perf_counter()
                kernels.block_input_grad(layer.weight, grad_z, local, grad_inputs)
            kernels.dense_backward(layer.weight, self.inputs[i], grad_z,
                                   self.grad_weight[i], self.grad_bias[i], None)
            self.seconds_compute += time.perf_counter() - started
            if i == 0:
                break
            below = layers[i - 1]
            grad_a = plan.finish_backward(grad_inputs)
            started = time.perf_counter()
            z = self._buf(self.z[i - 1], below.rows.size, batch)
            a = self._buf(self.a[i - 1], below.rows.size, batch)
            kernels.activation_grad(below.spec.activation, z, a, grad_a)
            self._buf(self.grad_z[i - 1], below.rows.size, batch)[...] = grad_a
            self.seconds_compute += time.perf_counter() - started

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(parameter, gradient) pairs of my rows, weights then bias per layer."""
        pairs = []
        for i, layer in enumerate(self.shard.layers):
            pairs.append((layer.weight, self.grad_weight[i]))
            pairs.append((layer.bias, self.grad_bias[i]))
        return pairs
