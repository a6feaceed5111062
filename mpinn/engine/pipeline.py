"""GPipe-style micro-batches: one batch as a pipeline of micro-batches over the stages of
the network (``train --micro-batches M``), so that with ``--strategy layers`` the owner of
one stage computes micro-batch k while the owner of the next computes k - 1."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from mpinn import kernels
from mpinn.engine.loss import BatchResult
from mpinn.shard import CsrLayerShard

if TYPE_CHECKING:
    from mpinn.engine.engine import Engine


def pipelined_step(engine: Engine, x_local: np.ndarray, labels: np.ndarray | None,
                   targets: np.ndarray | None, micro_batches: int,
                   samples: np.ndarray | None = None,
                   divisor: int | None = None) -> BatchResult:
    """Forward, loss and backward of one batch as a GPipe-style pipeline of micro-batches.

    Layers are grouped into stages: a new stage starts at every layer whose inputs cross
    ranks. Stage s works on micro-batch k at tick k + s forward (k + S - 1 - s backward),
    so with ``--strategy layers`` the owner of one stage computes micro-batch k while the
    owner of the next computes k - 1, instead of the ranks taking turns. Each tick
    finishes the exchanges between stages posted by the last one, computes, then posts
    its own; exchanges inside a stage complete at once. Every rank posts the same
    collectives in the same order, and a buffer is never rewritten while a message from
    it is in flight. Weight gradients come last, one product over the whole batch, so
    the result equals the unpipelined step up to rounding.
    """
    layers, plans, stage = engine.shard.layers, engine.plans, engine.stages
    n, batch = len(layers), x_local.shape[1]
    n_stages = stage[-1] + 1
    bounds = np.linspace(0, batch, min(micro_batches, batch) + 1).astype(int)
    cols = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    m = len(cols)
    z = [engine._buf(engine.z[i], ly.rows.size, batch) for i, ly in enumerate(layers)]
    a = [engine._buf(engine.a[i], ly.rows.size, batch) for i, ly in enumerate(layers)]
    grad_z = [engine._buf(engine.grad_z[i], ly.rows.size, batch) for i, ly in enumerate(layers)]
    if engine._batch_inputs is None:
        engine._batch_inputs = [np.empty((ly.inputs.size, engine.max_batch), ly.weight.dtype)
                              for ly in layers]
    inputs = [buf[:, :batch] for buf in engine._batch_inputs]
    first = [i == 0 or stage[i] != stage[i - 1] for i in range(n)]  # a stage's first layer
    total = BatchResult(0.0, 0)
    masks = engine._make_masks(samples)
    # what layer i reads: the activations below, after dropout when it is on
    below_out = a if masks is None else [
        engine._buf(engine._dropped[i], ly.rows.size, batch) for i, ly in enumerate(layers[:-1])]

    def source(i: int, k: int) -> np.ndarray:
        return x_local[:, cols[k]] if i == 0 else below_out[i - 1][:, cols[k]]

    contiguous = [isinstance(ly, CsrLayerShard) for ly in layers]  # CSR kernels need it
    scratch = tick_scratch(engine)

    def tick_view(which: int, rows: int, k: int) -> np.ndarray:
        """A (rows, micro-batch) C-contiguous work array, reused every tick."""
        width = cols[k].stop - cols[k].start
        return scratch[which][: rows * width].reshape(rows, width)

    def forward_layer(i: int, k: int) -> None:
        # Dense layers read the micro-batch's columns of the whole-batch inputs in place
        # (BLAS takes the row stride as the leading dimension); CSR kernels need
        # C-contiguous operands, so theirs are copied into a reused tick array. The
        # pre-activations go to a tick array for every layer and are copied in after:
        # written in place into the strided buffer, replicated float32 Adam training
        # (test_replicas, one-column micro-batches) left the reference's tolerance, for
        # a reason not yet found (see the commit that made this change).
        layer = layers[i]
        xk, zk, ak = inputs[i][:, cols[k]], tick_view(1, layer.rows.size, k), a[i][:, cols[k]]
        if contiguous[i]:
            xk = tick_view(0, layer.inputs.size, k)
            xk[...] = inputs[i][:, cols[k]]
        layer.forward_local(xk, zk)
        # the scratch is for the dense remote block; CSR rows add in place without it
        layer.forward_remote(xk, zk, tick_view(0, layer.rows.size, k))
        zk += layer.bias[:, None]
        z[i][:, cols[k]] = zk
        if i == n - 1 and engine.softmax:
            engine.output.softmax(zk, ak)
        else:
            kernels.activate(layer.spec.activation, zk, out=ak, cap=layer.spec.cap,
                             slope=layer.spec.negative_slope)
        if masks is not None and i < n - 1:
            np.multiply(ak, masks[i][:, cols[k]], out=below_out[i][:, cols[k]])
        if i == n - 1:
            gk = np.empty_like(zk)
            part = engine.output.loss_and_grad(zk, ak, None if labels is None else labels[cols[k]],
                                     None if targets is None else targets[:, cols[k]], gk,
                                     divisor or batch)
            grad_z[i][:, cols[k]] = gk
            total.loss_sum += part.loss_sum
            total.correct += part.correct

    def partial(i: int, k: int) -> np.ndarray:  # contiguous: it is an Ialltoallv buffer
        return engine._buf(engine.grad_inputs[i], layers[i].inputs.size, cols[k].stop - cols[k].start)

    def take_grad(i: int, k: int) -> None:  # summed partial sums of layer i -> dL/dz of i-1
        grad_a = plans[i].finish_backward(partial(i, k))
        below = layers[i - 1]
        if masks is not None:
            grad_a *= masks[i - 1][:, cols[k]]
        kernels.activation_grad(below.spec.activation, z[i - 1][:, cols[k]],
                                a[i - 1][:, cols[k]], grad_a, below.spec.cap,
                                below.spec.negative_slope)
        grad_z[i - 1][:, cols[k]] = grad_a

    def backward_layer(i: int, k: int) -> None:  # dL/dx only: weights wait (below)
        if i > 0:
            gk = grad_z[i][:, cols[k]]
            if contiguous[i]:
                gk = tick_view(1, layers[i].rows.size, k)
                gk[...] = grad_z[i][:, cols[k]]
            layers[i].input_grad_local(gk, partial(i, k))
            layers[i].input_grad_remote(gk, partial(i, k))

    plans[0].start_forward(source(0, 0))
    for t in range(m + n_stages - 1):
        for i in range(n):
            if first[i] and 0 <= t - stage[i] < m:
                plans[i].finish_forward()
                inputs[i][:, cols[t - stage[i]]] = plans[i].recv_view()
        started = time.perf_counter()
        for i in range(n):
            k = t - stage[i]
            if 0 <= k < m:
                if not first[i]:
                    inputs[i][:, cols[k]] = plans[i].forward(source(i, k))
                forward_layer(i, k)
        engine.seconds_compute += time.perf_counter() - started
        for i in range(n):  # post what the first layer of each stage computes next tick
            if first[i] and 0 <= t + 1 - stage[i] < m:
                plans[i].start_forward(source(i, t + 1 - stage[i]))

    for t in range(m + n_stages - 1):
        for i in range(1, n):
            k = t - 1 - (n_stages - 1 - stage[i])
            if first[i] and 0 <= k < m:
                take_grad(i, k)
        started = time.perf_counter()
        for i in range(n - 1, -1, -1):
            k = t - (n_stages - 1 - stage[i])
            if not 0 <= k < m:
                continue
            backward_layer(i, k)
            if i > 0 and not first[i]:  # the layer below is in this stage: sum at once
                plans[i].start_backward(partial(i, k))
                take_grad(i, k)
        engine.seconds_compute += time.perf_counter() - started
        for i in range(n - 1, 0, -1):
            k = t - (n_stages - 1 - stage[i])
            if first[i] and 0 <= k < m:
                plans[i].start_backward(partial(i, k))
    # Weight gradients need no other rank: one whole-batch GEMM per layer after the
    # pipeline, not one per micro-batch inside it. The ticks carry only the work that
    # others wait for, and a stage done early computes these while later ones drain.
    started = time.perf_counter()
    for i, layer in enumerate(layers):
        layer.weight_grad(grad_z[i], inputs[i], engine.grad_weight[i])
        np.sum(grad_z[i], axis=1, out=engine.grad_bias[i])
        if engine.reducer is not None:
            engine.reducer.post(i)
    engine.seconds_compute += time.perf_counter() - started
    engine._batch = batch
    return total


def tick_scratch(engine: Engine) -> list[np.ndarray]:
    """Two flat work arrays of the pipeline, each as large as the widest layer's inputs
    or rows times the largest batch; made on the first pipelined step."""
    if engine._scratch is None:
        widest = max(max(ly.inputs.size, ly.rows.size) for ly in engine.shard.layers)
        dtype = engine.shard.spec.dtype
        engine._scratch = [np.empty(widest * engine.max_batch, dtype) for _ in range(2)]
    return engine._scratch
