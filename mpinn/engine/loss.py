"""The output layer spread over ranks: its softmax, predicted classes, losses and dL/dz.

A rank holds some of the output neurons (``rows``) for every sample of the batch: the
softmax needs the global max and sum over the neurons of all ranks (two small allreduces
per batch), the predicted class the global argmax; each rank then adds up its rows' share
of the loss, which the loop sums once per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from mpinn import kernels
from mpinn._testing.faults import inject_fault
from mpinn.comm.collectives import MAX, MIN, SUM, allreduce
from mpinn.io.schema import LayerSpec


@dataclass
class BatchResult:
    """This rank's share of the loss summed over the batch, and the correctly classified count
    (the same on every rank)."""

    loss_sum: float
    correct: int


class SplitOutput:
    """The output layer's rows of this rank; buffers for the largest batch, made once."""

    def __init__(self, comm: MPI.Comm, spec: LayerSpec, rows: np.ndarray, max_batch: int,
                 dtype: np.dtype) -> None:
        self.comm = comm
        self.spec = spec
        self.rows = rows  # in-layer indices of my output neurons
        self.is_softmax = spec.activation == "softmax"
        self._max = np.empty(max_batch, dtype)  # the batch's global max, kept for the loss
        self._sum = np.empty(max_batch, dtype)  # and its global sum of exponentials

    def softmax(self, z: np.ndarray, out: np.ndarray) -> None:
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

    def predicted_class(self, outputs: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Index of the largest output per sample, lowest index on ties, over all ranks."""
        batch = outputs.shape[1]
        gmax = self._max[:batch]
        if self.is_softmax:
            values = z  # softmax already reduced max(z) into gmax; argmax z == argmax p
        else:
            if outputs.shape[0]:
                np.max(outputs, axis=0, out=gmax)
            else:
                gmax.fill(-np.inf)
            allreduce(self.comm, gmax, MAX)
            values = outputs
        big = np.iinfo(np.int64).max
        candidate = np.where(values == gmax[None, :], self.rows[:, None], big)
        best = candidate.min(axis=0) if candidate.shape[0] else np.full(batch, big)
        return allreduce(self.comm, np.ascontiguousarray(best, dtype=np.int64), MIN)

    def loss_and_grad(self, z: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None,
                      targets: np.ndarray | None, grad: np.ndarray, divisor: int) -> BatchResult:
        """Loss share and dL/dz (into ``grad``) of my output rows for these samples.

        Softmax with integer labels: cross-entropy; with float ``targets`` (probability
        distributions, checked by ``io.datafile.check_distributions``): soft-label cross-entropy.
        Otherwise half the squared error against ``targets`` (my output rows, neuron-major)
        or one-hot ``labels``. All are divided by ``divisor``, the size of the whole batch,
        also when these samples are a micro-batch.
        """
        layer = self.spec
        correct = 0
        if labels is not None:
            hits = kernels.label_hits(self.rows, labels)
            correct = int(np.count_nonzero(self.predicted_class(outputs, z) == labels))
        if labels is not None and self.is_softmax:
            batch = outputs.shape[1]
            log_sum = np.log(self._sum[:batch])
            loss = kernels.cross_entropy_local(z, self._max[:batch], log_sum, hits)
            np.subtract(outputs, hits, out=grad)
            grad /= divisor
        elif self.is_softmax and targets is not None:
            batch = outputs.shape[1]
            log_sum = np.log(self._sum[:batch])
            loss = kernels.soft_cross_entropy_local(z, self._max[:batch], log_sum, targets)
            np.subtract(outputs, targets, out=grad)
            grad /= divisor
        else:
            target = hits.astype(outputs.dtype) if labels is not None else targets
            loss = kernels.squared_error_local(outputs, target)
            np.subtract(outputs, target, out=grad)
            grad /= divisor
            kernels.activation_grad(layer.activation, z, outputs, grad, layer.cap,
                                     layer.negative_slope)
        if inject_fault("nan", self.comm.rank):
            loss = float("nan")
        return BatchResult(loss, correct)
