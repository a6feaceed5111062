"""Forward and backward over the layers, SPMD, from a shard, its exchange plans and kernels.

Every rank runs the same sequence: for each layer, gather the inputs its rows read
(``plan.forward``), compute its rows, and in backward send the partial sums of the inputs
back to their owners (``plan.backward``). A softmax output split over ranks uses the
global max and sum; the loss and accuracy are reduced the same way. The engine never
calls MPI itself: every message goes through the plans of comm/
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from mpi4py import MPI

from mpinn import kernels
from mpinn._testing.faults import inject_fault
from mpinn.comm.collectives import MAX, allreduce
from mpinn.comm.exchange import free_plans, make_plans
from mpinn.comm.plans import ExchangePlan
from mpinn.comm.replicas import GradientReducer, gradient_buffers
from mpinn.comm.topology import job_nodes
from mpinn.engine import pipeline
from mpinn.engine.loss import BatchResult, SplitOutput
from mpinn.errors import MpinnError
from mpinn.shard import LayerShard, Shard
from mpinn.trace import NULL, NullTracer

DEAD_CHECK_MAX = 16  # most layers between two checks for dead samples (Engine.forward)


# Across nodes, the GEMMs a layer runs while its exchange is in flight (own inputs forward;
# own partial sums and the weight gradient backward) run in this many parts of their rows,
# with a Test of the exchange between parts: Open MPI's TCP transport moves bytes only
# inside MPI calls, so one long GEMM held a 2 MB exchange until its Wait. Measured on 2
# servers at 1 Gbit/s (784-4096x3-10, batch 256): 652 -> 743-752 samples/s with 4 parts, 8
# the same, 2 and 16 slower. On one host the parts only cost (870 -> 844 samples/s: smaller
# GEMMs), so a job on one node runs whole GEMMs (docs/scaling.md).
OVERLAP_PARTS = 4


def overlap_parts(spans_nodes: bool) -> int:
    """The parts of the GEMMs beside an exchange in flight: ``OVERLAP_PARTS`` for a job
    across nodes, else 1; ``MPINN_OVERLAP_PARTS=N`` sets N for any job (benchmarks)."""
    forced = os.environ.get("MPINN_OVERLAP_PARTS", "").strip()
    if forced.isdigit() and int(forced) >= 1:
        return int(forced)
    return OVERLAP_PARTS if spans_nodes else 1


class Engine:
    """Runs batches through one rank's shard; plans and work buffers are built once."""

    def __init__(self, shard: Shard, comm: MPI.Comm, max_batch: int, training: bool = True,
                 exchange: str = "auto", nodes: np.ndarray | None = None) -> None:
        """``training=False`` (evaluate, predict, benchmarks) keeps no per-layer state for
        backward: all layers share two activation buffers and one pair of exchange buffers,
        so memory does not grow with depth. ``exchange``: the kind of exchange of every
        layer (``comm.exchange.make_plans``); ``nodes``: the node of every rank of ``comm``
        (default: asked of MPI)."""
        self.shard = shard
        self.comm = comm
        self.max_batch = max_batch
        self.training = training
        dtype = shard.spec.dtype
        layers = shard.layers
        if training:
            self.plans = make_plans(comm, shard.table, [(s.spec.index, s.inputs) for s in layers],
                                    max_batch, dtype, exchange=exchange,
                                    nodes=nodes)
            self.z = [np.empty(s.rows.size * max_batch, dtype) for s in layers]
            self.a = [np.empty(s.rows.size * max_batch, dtype) for s in layers]
            self.grad_z = [np.empty(s.rows.size * max_batch, dtype) for s in layers]
            self.grad_inputs = [np.empty(s.inputs.size * max_batch, dtype) for s in layers]
            # every layer's weight and bias gradients in one buffer, last layer first: with
            # replicas they are summed over the groups a bucket of layers at a time
            # (GradientReducer)
            self.grad_all, self.grad_flat = gradient_buffers(
                [s.weight.size + s.bias.size for s in layers], dtype)
            self.grad_weight = [flat[: s.weight.size].reshape(s.weight.shape)
                                for flat, s in zip(self.grad_flat, layers, strict=True)]
            self.grad_bias = [flat[s.weight.size:] for flat, s in zip(self.grad_flat, layers,
                                                                       strict=True)]
        else:
            # layer i reads layer i-1's activations only until its exchange is posted
            widest = max(s.rows.size for s in layers) * max_batch
            pool = [np.empty(widest, dtype) for _ in range(3)]
            self.plans = make_plans(comm, shard.table, [(s.spec.index, s.inputs) for s in layers],
                                    max_batch, dtype, shared=True, exchange=exchange,
                                    nodes=nodes)
            ExchangePlan.share_buffers(self.plans)
            self.z = [pool[i % 2] for i in range(len(layers))]
            self.a = [pool[i % 2] for i in range(len(layers))]
            self.z[-1] = pool[2]  # softmax and the class argmax need z beside the outputs
            self.grad_z = [pool[(i + 1) % 2] for i in range(len(layers))]  # remote-block scratch
            self.grad_inputs, self.grad_weight, self.grad_bias = [], [], []
            self.grad_flat = []
            self.grad_all = np.zeros(0, dtype)
        node = (nodes if nodes is not None else job_nodes(comm)) if comm.size > 1 else [0]
        self.parts = overlap_parts(bool(np.max(node) > 0))  # Engine._in_parts
        # The output layer's exchange has no GEMM of its own to hide behind (a few output
        # neurons read the whole layer below). Where the GEMMs run in parts it moves in
        # parts of the batch too: forward each part is posted as soon as the layer below has
        # computed its columns, backward the layer below takes each part as it arrives
        # (Engine._output_forward, _take_output_parts). Every rank decides alike.
        self.split_output = (training and self.parts > 1 and comm.size > 1 and len(layers) > 1
                             and layers[-2].parts and layers[-1].parts  # dense: strided
                             and self.plans[-1].kind == "alltoallv")
        self._output_inputs = (np.empty(layers[-1].inputs.size * max_batch, dtype)
                               if self.split_output else None)
        self.reducer: GradientReducer | None = None  # set_replicas: sums over the groups
        self.idle = False  # no_samples: this group sat the last batch out
        self.inputs: list[np.ndarray] = []
        self.output_rows = shard.layers[-1].rows
        self.output = SplitOutput(comm, shard.layers[-1].spec, self.output_rows, max_batch, dtype)
        self.softmax = self.output.is_softmax
        self._batch = 0
        self._batch_inputs: list[np.ndarray] | None = None  # the pipeline's per-batch inputs
        self._scratch: list[np.ndarray] | None = None  # the pipeline's tick arrays
        self._compact: np.ndarray | None = None  # live samples, when forward drops dead ones
        self._zero_stays_zero = False  # checked on the first forward that drops dead samples
        self.live = np.zeros(0, dtype=np.int64)
        # inverted dropout on hidden layers while training (``set_dropout``): per layer the
        # scaled mask of the last batch and the dropped activations the next layer reads
        self.dropout: list[float] = []  # per hidden layer
        self.dropout_seed, self.dropout_step = 0, 0
        self._masks: list[np.ndarray] = []
        self._dropped: list[np.ndarray] = []
        self._masked = False  # the last forward applied masks (backward applies them too)
        self.seconds_compute = 0.0  # GEMMs and elementwise kernels, for the benchmarks
        self.tracer: NullTracer = NULL  # set_tracer: a traced run's spans
        # pipeline stages: a new one starts where any rank receives remote inputs (agreed by
        # one small allreduce, so every rank groups the layers alike)
        remote = np.array([int(p.mpi_recv_counts.sum() > 0) for p in self.plans], dtype=np.int64)
        crossing = allreduce(comm, remote, MAX) > 0
        self.stages = np.cumsum([0] + [int(c) for c in crossing[1:]]).tolist()

    def close(self) -> None:
        """Free the communicators the exchange plans built (collective; the engine cannot
        run afterwards)."""
        free_plans(self.plans)

    def set_tracer(self, tracer: NullTracer) -> None:
        """Record spans of compute, pack and wait per layer into ``tracer`` (mpinn.trace)."""
        self.tracer = tracer
        for plan in self.plans:
            plan.tracer = tracer

    def _in_parts(self, plan: ExchangePlan, parts: bool, rows: int, what: str,
                  work: Callable[[slice], None]) -> None:
        """Run ``work`` over ``rows`` in ``self.parts`` parts, with a ``plan.progress()``
        between parts so that the exchange in flight moves while it computes."""
        count = self.parts if parts and plan.in_flight and rows >= 2 * self.parts else 1
        bounds = [rows * k // count for k in range(count + 1)]
        for k in range(count):
            started = time.perf_counter()
            work(slice(bounds[k], bounds[k + 1]) if count > 1 else slice(None))
            self._computed(started, what)
            if k + 1 < count:
                plan.progress()

    def _computed(self, started: float, what: str) -> None:
        """Count (and trace) the GEMMs and kernels that began at ``started``."""
        now = time.perf_counter()
        self.seconds_compute += now - started
        self.tracer.add(what, "compute", started, now)

    def _buf(self, flat: np.ndarray, rows: int, batch: int) -> np.ndarray:
        return flat[: rows * batch].reshape(rows, batch)

    @staticmethod
    def _part(flat: np.ndarray, rows: int, columns: slice) -> np.ndarray:
        """The contiguous (rows, width) block of the batch columns ``columns`` in ``flat``,
        laid out as an exchange in parts lays its buffers (``ExchangePlan._part_views``)."""
        block = flat[rows * columns.start: rows * columns.stop]
        return block.reshape(rows, columns.stop - columns.start)

    def set_replicas(self, across: MPI.Comm | None) -> None:
        """Sum every layer's gradients over ``across`` (the ranks holding my rows in the
        other groups) after each backward; None: one group, nothing to sum."""
        if not self.training:
            raise MpinnError("summing gradients over replicas is for training engines only")
        self.reducer = (None if across is None
                        else GradientReducer(across, self.grad_all, self.grad_flat))

    def finish_gradients(self) -> None:
        """Wait for the sums over the groups posted during backward (no-op with one group)."""
        if self.reducer is not None:
            self.reducer.wait()

    def no_samples(self) -> None:
        """This group got no sample of the batch (smaller than R): its gradients are zero,
        still summed with the other groups' (``post_gradients``), as every rank must post
        the same collectives."""
        self.grad_all.fill(0)
        self.idle = True

    def post_gradients(self) -> None:
        """Post the sums of every layer not posted yet (an idle group's zeros)."""
        if self.reducer is not None:
            self.reducer.post_all()

    def set_dropout(self, p: float | Sequence[float], seed: int) -> None:
        """Drop each hidden neuron's activation with probability ``p`` in training batches
        (those run with their sample indices), scaling the kept ones by 1 / (1 - p).

        ``p``: one rate for every hidden layer, or one per hidden layer (the rates a model
        file stores). The mask of neuron gid g on sample s at optimizer step
        ``dropout_step`` depends on (seed, step, g, s) alone (``kernels.dropout_mask``),
        never on the partition or the rank count.
        """
        hidden = self.shard.layers[:-1]
        rates = [p] * len(hidden) if isinstance(p, (int, float, np.number)) else list(p)
        if len(rates) != len(hidden):
            raise MpinnError(f"dropout gives {len(rates)} rates for {len(hidden)} hidden layers")
        for rate in rates:
            if not 0 <= rate < 1:
                raise MpinnError(f"--dropout must be in [0, 1), got {rate}")
        if any(rates) and not self.training:
            raise MpinnError("dropout is for training engines only")
        self.dropout, self.dropout_seed = [float(rate) for rate in rates], seed
        if any(rates) and not self._masks:
            self._masks = [np.empty(ly.rows.size * self.max_batch, ly.weight.dtype) for ly in hidden]
            self._dropped = [np.empty(ly.rows.size * self.max_batch, ly.weight.dtype)
                             for ly in hidden]

    def _make_masks(self, samples: np.ndarray | None) -> list[np.ndarray] | None:
        """The scaled masks of this batch's hidden layers, or None without dropout."""
        self._masked = any(self.dropout) and samples is not None
        if not self._masked:
            return None
        masks = []
        for i, layer in enumerate(self.shard.layers[:-1]):
            mask = self._buf(self._masks[i], layer.rows.size, samples.size)
            if self.dropout[i]:
                gids = self.shard.table.gid(layer.spec.index, layer.rows)
                kernels.dropout_mask(self.dropout_seed, self.dropout_step, gids, samples,
                                     self.dropout[i], mask)
            else:
                mask.fill(1)  # a layer stored without dropout keeps every activation
            masks.append(mask)
        return masks

    # ------------------------------------------------------------ forward

    def forward(self, x_local: np.ndarray, drop_dead: bool = False,
                samples: np.ndarray | None = None) -> np.ndarray:
        """Outputs of my output rows, (rows, batch), from my owned input features (n, batch).

        ``samples``: the batch's indices in the data set, given for training batches: with
        dropout set, they pick the masks.

        ``drop_dead`` (inference of ReLU-family networks with no positive bias, the Graph
        Challenge's case): a sample whose activations are zero on every rank stays zero in
        every later layer, so the ranks agree on the live samples (one small allreduce)
        and drop the others: after every layer while samples die, then after 2, 4, ... up
        to ``DEAD_CHECK_MAX`` layers while none does (a dead sample kept a while longer
        costs only its zeros' arithmetic; each check is a synchronisation, which across a
        slow link costs more). The outputs then hold only the samples ``self.live``
        (indices into the batch).
        """
        inject_fault("step", self.comm.rank)
        batch = x_local.shape[1]
        self._batch = batch
        self.inputs = []
        self.live = np.arange(batch)
        if drop_dead and not self._zero_stays_zero:
            self._check_zero_stays_zero()  # once: an inference engine's biases never change
            self._zero_stays_zero = True
        activations = x_local
        last = len(self.shard.layers) - 1
        masks = self._make_masks(samples)
        check_at, interval = 0, 1  # the next layer after which drop_dead checks, and the gap
        trace = self.tracer
        columns = self._output_columns(batch)
        for i, (layer, plan) in enumerate(zip(self.shard.layers, self.plans, strict=True)):
            with trace.span(f"forward {layer.spec.index}", "layer"):
                z = self._buf(self.z[i], layer.rows.size, batch)
                a = self._buf(self.a[i], layer.rows.size, batch)
                # the dL/dz buffer is free until backward
                scratch = self._buf(self.grad_z[i], layer.rows.size, batch)
                if columns and i == last:  # posted in parts by the layer below
                    gathered = self._output_forward(layer, plan, columns, z, scratch, batch)
                else:
                    gathered = plan.start_forward(activations)
                    self._in_parts(plan, layer.parts, layer.rows.size, "own inputs",
                                   lambda part, g=gathered, z=z, ly=layer:
                                   ly.forward_local(g, z, part))
                    plan.finish_forward()
                self.inputs.append(gathered)
                if masks is not None and i < last:  # a stays for the derivative, dropped goes on
                    activations = self._buf(self._dropped[i], layer.rows.size, batch)
                else:
                    activations = a
                # the rest by columns where the output layer's exchange goes in parts
                for cols in (columns if columns and i == last - 1 else [slice(None)]):
                    started = time.perf_counter()
                    zc = z[:, cols]
                    if not (columns and i == last):
                        layer.forward_remote(gathered[:, cols], zc, scratch[:, cols])
                    zc += layer.bias[:, None]
                    if i == last and self.softmax:
                        self.output.softmax(zc, a[:, cols])
                    else:
                        kernels.activate(layer.spec.activation, zc, out=a[:, cols],
                                         cap=layer.spec.cap, slope=layer.spec.negative_slope)
                    if masks is not None and i < last:
                        np.multiply(a[:, cols], masks[i][:, cols], out=activations[:, cols])
                    self._computed(started, "remote inputs")
                    if columns and i == last - 1:
                        self.plans[last].start_forward_part(activations[:, cols], cols)
                        self.plans[last].progress()
            if drop_dead and check_at <= i < last:
                activations = self._drop_dead(a)
                died = activations.shape[1] < batch
                batch = activations.shape[1]
                interval = 1 if died else min(2 * interval, DEAD_CHECK_MAX)
                check_at = i + interval
        return activations

    def _output_columns(self, batch: int) -> list[slice]:
        """The parts of the batch the output layer's exchange moves in (``split_output``),
        or none."""
        if not self.split_output or batch < 2 * self.parts:
            return []
        bounds = [batch * k // self.parts for k in range(self.parts + 1)]
        return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def _output_forward(self, layer: LayerShard, plan: ExchangePlan, columns: list[slice],
                        z: np.ndarray, scratch: np.ndarray, batch: int) -> np.ndarray:
        """The output layer's pre-activations ``z`` (less the bias), a part of the batch at a
        time as its exchange parts arrive; returns its gathered inputs (n_inputs, batch),
        copied out of the parts for the weight gradient."""
        assert self._output_inputs is not None
        gathered = self._buf(self._output_inputs, layer.inputs.size, batch)
        for cols in columns:
            received = plan.finish_part(cols)
            started = time.perf_counter()
            layer.forward_local(received, z[:, cols])
            layer.forward_remote(received, z[:, cols], scratch[:, cols])
            gathered[:, cols] = received
            self._computed(started, "output part")
        return gathered

    def _check_zero_stays_zero(self) -> None:
        """Refuse ``drop_dead`` where a zero input need not give a zero output."""
        if self.training:
            raise MpinnError("dropping dead samples is for inference only")
        worst = np.array([max((float(ly.bias.max()) for ly in self.shard.layers if ly.bias.size),
                              default=-np.inf)])
        allreduce(self.comm, worst, MAX)
        acts = {ly.spec.activation for ly in self.shard.layers}
        if worst[0] > 0 or not acts <= {"relu", "relu_cap"}:
            raise MpinnError("dropping dead samples needs relu or relu_cap layers and no positive "
                             f"bias (activations {sorted(acts)}, largest bias {worst[0]:g})")

    def _drop_dead(self, a: np.ndarray) -> np.ndarray:
        """``a`` without the samples that are zero on every rank (all ranks agree)."""
        live = np.ascontiguousarray(a.any(axis=0) if a.shape[0] else np.zeros(a.shape[1], bool),
                                    dtype=np.uint8)
        allreduce(self.comm, live, MAX)
        if live.all():
            return a
        keep = live.astype(bool)
        self.live = self.live[keep]
        if self._compact is None:
            self._compact = np.empty(max(s.rows.size for s in self.shard.layers) * self.max_batch,
                                     a.dtype)
        out = self._compact[: a.shape[0] * self.live.size].reshape(a.shape[0], self.live.size)
        np.compress(keep, a, axis=1, out=out)
        return out

    def predicted_class(self, outputs: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Index of the largest output per sample, lowest index on ties, over all ranks."""
        return self.output.predicted_class(outputs, z)

    def loss_and_grad(self, outputs: np.ndarray, labels: np.ndarray | None,
                      targets: np.ndarray | None, divisor: int | None = None) -> BatchResult:
        """Loss of the batch and dL/dz of my output rows (stored for ``backward``).

        ``divisor``: the size of the whole batch when these samples are one group's share
        of it (replicas), so the gradients summed over the groups are the whole batch's."""
        batch = outputs.shape[1]
        rows = self.output_rows.size
        with self.tracer.span("loss", "compute"):
            return self.output.loss_and_grad(self._buf(self.z[-1], rows, batch), outputs,
                                             labels, targets,
                                             self._buf(self.grad_z[-1], rows, batch),
                                             divisor or batch)

    # ------------------------------------------------------------ backward

    def backward(self, sgd_lr: float | None = None) -> None:
        """Gradients of my rows for the last forward, from the output dL/dz of ``loss_and_grad``.

        ``sgd_lr``: take plain SGD's step (w -= lr dL/dw) as each layer's gradients are
        made, in the weight-gradient GEMM (``LayerShard.sgd_update``), instead of leaving
        the gradients for an optimizer pass; only with one group, whose gradients need no
        sum over replicas first.
        """
        if sgd_lr is not None and self.reducer is not None:
            raise MpinnError("the SGD step inside backward needs the gradients of one group")
        batch = self._batch
        layers = self.shard.layers
        trace = self.tracer
        last = len(layers) - 1
        columns = self._output_columns(batch)
        remote_done = False  # this layer's remote partial sums came with the parts above
        for i in range(last, -1, -1):
            layer: LayerShard = layers[i]
            plan = self.plans[i]
            with trace.span(f"backward {layer.spec.index}", "layer"):
                grad_z = self._buf(self.grad_z[i], layer.rows.size, batch)
                if i > 0 and columns and i == last:
                    self._output_partial_sums(layer, plan, columns, grad_z)
                elif i > 0:
                    # remote partial sums first, so they travel while the rest is computed
                    grad_inputs = self._buf(self.grad_inputs[i], layer.inputs.size, batch)
                    if not remote_done:
                        started = time.perf_counter()
                        layer.input_grad_remote(grad_z, grad_inputs)
                        self._computed(started, "remote partial sums")
                    plan.start_backward(grad_inputs)
                    self._in_parts(plan, layer.parts, layer.n_local, "own partial sums",
                                   lambda part, ly=layer, g=grad_z, gi=grad_inputs:
                                   ly.input_grad_local(g, gi, part))
                started = time.perf_counter()
                np.sum(grad_z, axis=1, out=self.grad_bias[i])
                self._computed(started, "bias gradient")
                x, gw = self.inputs[i], self.grad_weight[i]
                if sgd_lr is None:
                    self._in_parts(plan, layer.parts, layer.rows.size, "weight gradient",
                                   lambda part, ly=layer, g=grad_z, x=x, gw=gw:
                                   ly.weight_grad(g, x, gw, part))
                else:  # this layer's weights are not read again in this backward
                    self._in_parts(plan, layer.parts, layer.rows.size, "weight gradient, SGD",
                                   lambda part, ly=layer, g=grad_z, x=x, gw=gw:
                                   ly.sgd_update(g, x, gw, sgd_lr, part))
                    started = time.perf_counter()
                    kernels.axpy(-sgd_lr, self.grad_bias[i], layer.bias)
                    self._computed(started, "bias SGD")
                if self.reducer is not None:  # summed over the groups while backward goes on
                    self.reducer.post(i)
                if i == 0:
                    break
                below = layers[i - 1]
                if columns and i == last:
                    self._take_output_parts(below, plan, columns, batch)
                    remote_done = i - 1 > 0
                    continue
                grad_a = plan.finish_backward(grad_inputs)
                started = time.perf_counter()
                if self._masked:
                    grad_a *= self._buf(self._masks[i - 1], below.rows.size, batch)
                z = self._buf(self.z[i - 1], below.rows.size, batch)
                a = self._buf(self.a[i - 1], below.rows.size, batch)
                kernels.activation_grad(below.spec.activation, z, a, grad_a, below.spec.cap,
                                        below.spec.negative_slope)
                self._buf(self.grad_z[i - 1], below.rows.size, batch)[...] = grad_a
                self._computed(started, "activation gradient")

    def _output_partial_sums(self, layer: LayerShard, plan: ExchangePlan,
                             columns: list[slice], grad_z: np.ndarray) -> None:
        """The output layer's partial sums, posted a part of the batch at a time (each part
        a contiguous block of its ``grad_inputs`` buffer, as the plan's parts are)."""
        n = layer.inputs.size
        for cols in columns:
            started = time.perf_counter()
            partial = self._part(self.grad_inputs[-1], n, cols)
            layer.input_grad_remote(grad_z[:, cols], partial)
            self._computed(started, "remote partial sums")
            plan.start_backward_part(partial, cols)
        for cols in columns:
            started = time.perf_counter()
            partial = self._part(self.grad_inputs[-1], n, cols)
            layer.input_grad_local(grad_z[:, cols], partial)
            self._computed(started, "own partial sums")
            plan.progress()

    def _take_output_parts(self, below: LayerShard, plan: ExchangePlan, columns: list[slice],
                           batch: int) -> None:
        """dL/dz of the layer below the output, a part of the batch at a time as the output
        layer's partial sums arrive; with each part, that layer's remote partial sums, so
        the parts still in flight move while it computes."""
        i = len(self.shard.layers) - 2
        n = self.shard.layers[-1].inputs.size
        grad_z = self._buf(self.grad_z[i], below.rows.size, batch)
        z = self._buf(self.z[i], below.rows.size, batch)
        a = self._buf(self.a[i], below.rows.size, batch)
        grad_inputs = self._buf(self.grad_inputs[i], below.inputs.size, batch) if i > 0 else None
        for cols in columns:
            partial = self._part(self.grad_inputs[-1], n, cols)
            summed = plan.finish_backward_part(partial, cols)
            started = time.perf_counter()
            grad = grad_z[:, cols]
            grad[...] = summed
            if self._masked:
                grad *= self._buf(self._masks[i], below.rows.size, batch)[:, cols]
            kernels.activation_grad(below.spec.activation, z[:, cols], a[:, cols], grad,
                                    below.spec.cap, below.spec.negative_slope)
            self._computed(started, "activation gradient")
            if grad_inputs is not None:
                started = time.perf_counter()
                below.input_grad_remote(grad, grad_inputs[:, cols])
                self._computed(started, "remote partial sums")
            plan.progress()

    # ------------------------------------------------------------ micro-batch pipeline

    def pipelined_step(self, x_local: np.ndarray, labels: np.ndarray | None,
                       targets: np.ndarray | None, micro_batches: int,
                       samples: np.ndarray | None = None,
                       divisor: int | None = None) -> BatchResult:
        """Forward, loss and backward of one batch as a pipeline of micro-batches
        (``engine.pipeline``)."""
        return pipeline.pipelined_step(self, x_local, labels, targets, micro_batches, samples, divisor)

    def parameters(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(parameter, gradient) pairs of my rows, weights then bias per layer."""
        pairs = []
        for i, layer in enumerate(self.shard.layers):
            pairs.append((layer.weight, self.grad_weight[i]))
            pairs.append((layer.bias, self.grad_bias[i]))
        return pairs
