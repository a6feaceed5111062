"""The cost model of a layout: the predicted step time of R replicas x Q ranks per group.

A layout runs P = R x Q ranks: Q ranks hold one copy of the partitioned model (a strategy
computed for Q), R such groups each take 1/R of every batch, and after backward each rank
sums its weight gradients with the R - 1 ranks that own the same rows in the other groups.
Numbers in, predictions out: the model's layer widths, the global batch, bytes per value,
and a ``Machine`` (GEMM rate, link bandwidth and latency) that ``probe`` measures in a few
seconds. docs/scaling.md derives every term; ``choose`` is what ``--replicas auto`` and
``partition --plan`` call. Nothing here talks to MPI except ``probe``, and it only through
comm/.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from mpinn import kernels
from mpinn.config import seconds_from_env
from mpinn.errors import MpinnError
from mpinn.optim import steps_in_backward
from mpinn.partition import strategies

# Shared memory between processes of one host, as measured here (docs/scaling.md: 2-4.5
# GB/s), for a probe that has a single rank and so cannot time an exchange.
ASSUMED_BANDWIDTH = 3e9
ASSUMED_LATENCY = 5e-6
# Defaults for a Machine made by hand (tests, docs); the probe measures all three.
# Python and bookkeeping per layer and pass (forward or backward) of one micro-batch.
OVERHEAD_PER_LAYER = 60e-6
# An SGD update reads a weight and its gradient and writes the weight: memory-bound.
UPDATE_PER_PARAMETER = 0.6e-9
# Bias, activation, its derivative and the bias gradient, per (row, sample) of a layer.
ELEMENTWISE_PER_VALUE = 1e-9
# Per step of a Q-rank group, reductions of one value per sample: the softmax's max and
# sum, the loss, and train's stop check.
REDUCTIONS = 4
MAX_RANKS = 1 << 20  # candidates are enumerated, one per divisor
# The probe's gradient sum per R: the busiest rank's gradients, at most this many bytes
# (a sum of this size runs at the rate of a larger one, in a few tens of ms).
ALLREDUCE_PROBE_BYTES = 16 << 20
# Layouts modelled faster than this are also timed (``time_small``): their steps are mostly
# fixed costs, which the model's parts do not add up to within 20%.
TIME_BELOW = 5e-3


@dataclasses.dataclass(frozen=True)
class Machine:
    """What one rank can do while all ranks work at once.

    GEMMs follow Hockney's model: a product whose smallest dimension is d runs at
    ``gflops * d / (d + d_half)`` GFLOP/s, so thin products (few rows per rank, few
    samples per group) are slower per FLOP. A message of m bytes takes
    ``latency + m / bandwidth`` seconds.
    """

    gflops: float
    d_half: float
    bandwidth: float
    latency: float
    overhead: float = OVERHEAD_PER_LAYER
    update: float = UPDATE_PER_PARAMETER  # optimizer seconds per parameter a rank holds
    elementwise: float = ELEMENTWISE_PER_VALUE  # seconds per (row, sample) of a layer
    measured_links: bool = True  # False: bandwidth and latency are the assumed defaults
    # (R, bytes/s): the gradient sum over R groups as measured, ring bytes per second
    # (Open MPI's nonblocking allreduce reaches a half to a third of the link bandwidth)
    allreduce_rates: tuple[tuple[int, float], ...] = ()

    def gemm_seconds(self, m: int, k: int, n: int) -> float:
        """Seconds of an (m x k) @ (k x n) product on one rank."""
        d = min(m, k, n)
        if d == 0:
            return 0.0
        return 2.0 * m * k * n / (self.gflops * 1e9 * d / (d + self.d_half))

    def message_seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclasses.dataclass(frozen=True)
class Layout:
    """R replicas of a Q-rank partition with ``strategy``, batches cut in ``micro_batches``."""

    replicas: int
    group: int
    strategy: str = "balanced"
    micro_batches: int = 1

    def __str__(self) -> str:
        text = f"{self.replicas}x{self.group} {self.strategy}"
        return text + (f" M={self.micro_batches}" if self.micro_batches > 1 else "")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Seconds per step of one layout, by part, and the bytes one rank sends per step."""

    layout: Layout
    compute: float
    exchange: float
    allreduce: float
    overhead: float
    optimizer: float
    exchange_bytes: float
    allreduce_bytes: float
    rank_parameters: int  # weights and biases the busiest rank holds
    timed: float | None = None  # seconds of real steps on the job's ranks (``time_small``)

    @property
    def modelled(self) -> float:
        """Seconds per step from the parts: they add (no overlap is assumed)."""
        return self.compute + self.exchange + self.allreduce + self.overhead + self.optimizer

    @property
    def step(self) -> float:
        """Predicted seconds per step: the timed one where the layout was timed, else the
        modelled one."""
        return self.timed if self.timed is not None else self.modelled


def predict(sizes: Sequence[int], batch: int, itemsize: int, layout: Layout,
            machine: Machine) -> Prediction:
    """Predicted step time of a dense MLP with widths ``sizes`` on ``layout``.

    Each group runs ceil(batch / R) samples (the largest share). ``balanced``: every layer
    split in Q row blocks, each rank reading all inputs (docs/scaling.md, "Per
    strategy"). ``layers``: contiguous groups of layers per rank as ``partition`` makes
    them, run as a GPipe pipeline of ``micro_batches``.
    """
    _check(sizes, batch, layout)
    b = -(-batch // layout.replicas)
    if layout.strategy == "balanced":
        compute, exchange, nbytes, params = _balanced(sizes, b, itemsize, layout.group, machine)
        passes = 2 * (len(sizes) - 1)
    else:
        compute, exchange, nbytes, params = _layers(sizes, b, itemsize, layout, machine)
        passes = 2 * (len(sizes) - 1) * layout.micro_batches
    r = layout.replicas
    # one ring allreduce per bucket of the rank's rows (comm.replicas.gradient_buckets, counted
    # on the balanced split's layers): 2(R-1)/R of their bytes, 2(R-1) steps each
    ring_bytes = 2.0 * (r - 1) / r * params * itemsize
    allreduce = 0.0
    measured = dict(machine.allreduce_rates)
    if r in measured:  # the probe timed this sum at this R
        allreduce = ring_bytes / measured[r]
    elif r > 1:
        from mpinn.comm.replicas import gradient_buckets
        buckets = len(gradient_buckets([v * itemsize for v in _rank_values(sizes, layout.group)]))
        allreduce = ring_bytes / machine.bandwidth + 2 * (r - 1) * buckets * machine.latency
    # where train steps inside backward, the update makes no pass of its own
    fused = steps_in_backward(True, r, layout.micro_batches)
    return Prediction(layout, compute, exchange, allreduce, passes * machine.overhead,
                      0.0 if fused else params * machine.update, nbytes, ring_bytes, params)


def layer_ranks(sizes: Sequence[int], q: int) -> list[int]:
    """The rank of each layer (the input layer first) when ``partition`` places a dense
    model of ``sizes`` as contiguous groups of whole layers on ``q`` ranks."""
    nnz = [np.full(n_out, n_in) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)]
    return strategies.layer_blocks(sizes, q, nnz)


def _rank_values(sizes: Sequence[int], q: int) -> list[int]:
    """Weights and biases per layer of the busiest rank, balanced on Q."""
    return [-(-n_out // q) * (n_in + 1) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)]


def _check(sizes: Sequence[int], batch: int, layout: Layout) -> None:
    if len(sizes) < 2 or min(sizes) < 1:
        raise MpinnError(f"layer sizes {list(sizes)}: need at least two positive widths")
    if layout.replicas < 1 or layout.group < 1:
        raise MpinnError(f"layout {layout}: replicas and group size must be positive")
    if batch < layout.replicas:
        raise MpinnError(f"a batch of {batch} cannot be shared by {layout.replicas} replicas")
    if layout.strategy not in ("balanced", "layers"):
        raise MpinnError(f"the cost model knows balanced and layers, not {layout.strategy!r}")
    if layout.micro_batches < 1 or (layout.strategy == "balanced" and layout.micro_batches > 1):
        raise MpinnError(f"layout {layout}: micro-batches are for the layers strategy")


def _balanced(sizes: Sequence[int], b: int, itemsize: int, q: int,
              machine: Machine) -> tuple[float, float, float, int]:
    """(compute s, exchange s, bytes sent, parameters) of the busiest rank, balanced on Q."""
    compute = exchange = nbytes = 0.0
    params = 0
    for layer, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        rows = -(-n_out // q)
        params += rows * (n_in + 1)
        passes = 3 if layer > 1 else 2  # forward, weight gradient, input gradient
        compute += passes * machine.gemm_seconds(rows, n_in, b) + rows * b * machine.elementwise
        if q > 1:
            # each of the Q-1 others sends its n_in/Q inputs of b samples; backward returns
            # as many partial sums (not for the first layer: inputs need no gradient)
            block = -(-n_in // q) * b * itemsize
            directions = 2 if layer > 1 else 1
            exchange += directions * (q - 1) * machine.message_seconds(block)
            nbytes += directions * (q - 1) * block
    if q > 1:  # REDUCTIONS of b values, a tree of log2 Q steps each
        exchange += REDUCTIONS * math.ceil(math.log2(q)) * machine.message_seconds(b * itemsize)
    return compute, exchange, nbytes, params


def _messages(depth: int, q: int) -> int:
    """Messages one rank waits for per step, balanced on Q, as ``_balanced`` counts them:
    Q - 1 per exchange (``depth`` forward, ``depth - 1`` backward) and the reductions."""
    return (2 * depth - 1) * (q - 1) + REDUCTIONS * math.ceil(math.log2(q))


def _layers(sizes: Sequence[int], b: int, itemsize: int, layout: Layout,
            machine: Machine) -> tuple[float, float, float, int]:
    """The same for whole layers per rank as a pipeline of M micro-batches.

    Stage s computes micro-batch k at tick k + s: M + S - 1 ticks forward and as many
    backward, each as long as the slowest stage's share of one micro-batch plus the one
    message across a stage boundary; weight gradients follow over the whole batch.
    """
    n_layers, m = len(sizes) - 1, layout.micro_batches
    owner = layer_ranks(sizes, layout.group)[1:]  # the rank of each layer
    mb = -(-b // m)
    stages = sorted(set(owner))
    fwd = {s: 0.0 for s in stages}
    bwd = {s: 0.0 for s in stages}
    wgrad = {s: 0.0 for s in stages}
    params = {s: 0 for s in stages}
    for layer in range(n_layers):
        n_in, n_out, s = sizes[layer], sizes[layer + 1], owner[layer]
        fwd[s] += machine.gemm_seconds(n_out, n_in, mb) + n_out * mb * machine.elementwise
        if layer > 0:
            bwd[s] += machine.gemm_seconds(n_out, n_in, mb)
        wgrad[s] += machine.gemm_seconds(n_out, n_in, b)
        params[s] += n_out * (n_in + 1)
    crossings = [sizes[layer] for layer in range(1, n_layers) if owner[layer] != owner[layer - 1]]
    message = max((machine.message_seconds(n * mb * itemsize) for n in crossings), default=0.0)
    ticks = m + len(stages) - 1
    compute = ticks * (max(fwd.values()) + max(bwd.values())) + max(wgrad.values())
    exchange = 2 * ticks * message if crossings else 0.0
    nbytes = 2.0 * max(crossings, default=0) * b * itemsize
    return compute, exchange, nbytes, max(params.values())


def candidates(ranks: int, sizes: Sequence[int], batch: int,
               micro_batches: Iterable[int] = (1, 2, 4, 8, 16)) -> list[Layout]:
    """Every R x Q = ``ranks`` with R <= batch: balanced for each Q, and for 1 < Q <= the
    layer count also ``layers`` at each micro-batch count that leaves samples in each."""
    if not 1 <= ranks <= MAX_RANKS:
        raise MpinnError(f"the cost model compares layouts of 1 to {MAX_RANKS:,} ranks, not {ranks:,}")
    out = []
    for q in range(1, ranks + 1):
        r = ranks // q
        if r * q != ranks or r > batch:
            continue
        out.append(Layout(r, q))
        if 1 < q <= len(sizes) - 1:
            b = -(-batch // r)
            out.extend(Layout(r, q, "layers", m) for m in micro_batches if m <= b)
    return out


def choose(sizes: Sequence[int], batch: int, ranks: int, machine: Machine, itemsize: int = 4,
           max_rank_parameters: int | None = None,
           layouts: Sequence[Layout] | None = None) -> tuple[Prediction, list[Prediction]]:
    """The layout of least predicted step time for ``ranks`` ranks, and every candidate's
    prediction, fastest first.

    ``max_rank_parameters`` drops layouts whose busiest rank would hold more weights and
    biases (a memory bound; R = P holds the whole model on every rank).
    """
    table = [predict(sizes, batch, itemsize, lay, machine)
             for lay in (layouts if layouts is not None else candidates(ranks, sizes, batch))]
    if max_rank_parameters is not None:
        table = [p for p in table if p.rank_parameters <= max_rank_parameters]
    if not table:
        raise MpinnError(f"no layout of {ranks} ranks fits (batch {batch}, at most "
                         f"{max_rank_parameters} parameters per rank)")
    table.sort(key=lambda p: (p.step, p.layout.replicas))
    return table[0], table


def format_table(chosen: Prediction, table: Sequence[Prediction], batch: int) -> str:
    """The candidates as ``partition --plan`` prints them, the chosen one marked."""
    lines = [f"  {'layout R x Q':<22} {'step ms':>8} {'from':>6} {'compute':>8} {'exchange':>8} "
             f"{'allreduce':>9} {'python':>7} {'update':>7} {'sent MB':>8} {'samples/s':>10}"]
    for p in table:
        mark = "  <- chosen" if p is chosen else ""
        source = "timed" if p.timed is not None else "model"
        lines.append(f"  {str(p.layout):<22} {1e3 * p.step:>8.2f} {source:>6} {1e3 * p.compute:>8.2f} "
                     f"{1e3 * p.exchange:>8.2f} {1e3 * p.allreduce:>9.2f} {1e3 * p.overhead:>7.2f} "
                     f"{1e3 * p.optimizer:>7.2f} "
                     f"{(p.exchange_bytes + p.allreduce_bytes) / 1e6:>8.2f} "
                     f"{batch / p.step:>10.0f}{mark}")
    return "\n".join(lines)


def time_small(comm: object, sizes: Sequence[int], batch: int, dtype: str,
               table: Sequence[Prediction], seconds: float = 0.3) -> list[Prediction]:
    """``table`` with every layout modelled under ``TIME_BELOW`` timed on the job's ranks
    (real training steps of a model of these widths, made in memory), fastest first.

    A step that short is mostly fixed costs (a kernel call, a message's synchronisation,
    the interpreter), which the parts add up to within 2x, not the 20% the choice needs:
    on 2 cores the digits model's two layouts were modelled 0.8 and 0.9 ms and ran 1.9
    and 1.3, so the model picked the slower. Timing them, as FFTW's planner measures its
    candidates, costs a fraction of a second per layout. Collective: every rank holds the
    same table (the probe's figures are agreed), so all time the same layouts; a table for
    another rank count than the job's is returned as it is."""
    out = []
    for p in table:
        if p.modelled < TIME_BELOW and p.layout.replicas * p.layout.group == comm.Get_size():
            p = dataclasses.replace(p, timed=_layout_seconds(comm, sizes, batch,
                                                             np.dtype(dtype), p.layout, seconds))
        out.append(p)
    out.sort(key=lambda p: (p.step, p.layout.replicas))
    return out


# ------------------------------------------------------------------ measuring the machine


def fit_d_half(rate_wide: float, d_wide: int, rate_thin: float, d_thin: int) -> tuple[float, float]:
    """(peak GFLOP/s, d_half) of Hockney's GEMM model through two measured rates."""
    slope = rate_wide / d_wide - rate_thin / d_thin
    d_half = max(0.0, (rate_thin - rate_wide) / slope) if slope else 0.0
    return rate_wide * (d_wide + d_half) / d_wide, d_half


def fit_link(seconds_small: float, bytes_small: int, seconds_large: float,
             bytes_large: int) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of one message through two measured message times."""
    bandwidth = (bytes_large - bytes_small) / max(seconds_large - seconds_small, 1e-12)
    latency = max(0.0, seconds_small - bytes_small / bandwidth)
    return bandwidth, latency


def _best_seconds(action: Callable[[], object], seconds: float) -> float:
    """The shortest of as many runs of ``action`` as fit in about ``seconds`` (one at least)."""
    action()
    best, start = math.inf, time.perf_counter()
    while True:
        t = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() - start >= seconds:
            return best


def _gemm_rate(comm: object, m: int, k: int, n: int, dtype: np.dtype, seconds: float) -> float:
    """GFLOP/s of the three products a layer of ``m`` rows, ``k`` inputs and ``n`` samples
    runs each step, as the engine runs them (kernels.py): forward ``W x``, weight gradient
    ``dz x^T`` and input gradient ``W^T dz``. Every rank runs them at once in rounds that
    start together, as a step's layers start after an exchange, and the rate is that of the
    mean round's slowest rank: a step waits on each layer's slowest rank, and on a box whose
    cores share out unequally that is a different rank each time (16 cores of a lent VM ran
    the same GEMM at 51-81 GFLOP/s per rank at once, the slow ones changing from round to
    round), so each rank's best time, or the slowest rank's average, predicted 1x16 steps
    20% short. Collective; every rank returns the same rate."""
    from mpinn.comm.collectives import MAX, allreduce
    rng = np.random.default_rng(0)
    w, x, dz = (rng.random(shape).astype(dtype) for shape in ((m, k), (k, n), (m, n)))
    z, gw, gx = np.empty((m, n), dtype), np.empty((m, k), dtype), np.empty((k, n), dtype)
    columns = slice(0, k)

    def layer() -> None:
        kernels.block_forward(w, x, columns, z)
        kernels.dense_weight_grad(dz, x, gw)
        kernels.block_input_grad(w, dz, columns, gx)

    layer()
    slowest = allreduce(comm, np.array(_timed_rounds(comm, layer, seconds)), MAX)
    return 3 * 2.0 * m * k * n / float(np.mean(slowest)) / 1e9


def _elementwise_seconds(rows: int, batch: int, dtype: np.dtype, seconds: float) -> float:
    """Seconds per (row, sample) of a layer's elementwise work in one step, as the engine
    does it: bias, activation and its derivative, the copy of dL/dz, the bias gradient."""
    z = np.random.default_rng(0).standard_normal((rows, batch)).astype(dtype)
    a, grad, grad_z = np.empty_like(z), np.ones_like(z), np.empty_like(z)
    bias, grad_bias = np.zeros(rows, dtype), np.empty(rows, dtype)

    def layer() -> None:
        np.add(z, bias[:, None], out=z)
        kernels.activate("relu", z, out=a)
        kernels.activation_grad("relu", z, a, grad, None, None)
        grad_z[...] = grad
        np.sum(grad_z, axis=1, out=grad_bias)

    return _best_seconds(layer, seconds) / z.size


def _update_seconds(n: int, dtype: np.dtype, seconds: float) -> float:
    """Seconds per parameter of the SGD update (optim.SGD) of ``n`` parameters."""
    from mpinn.optim import SGD
    w, g = np.ones(n, dtype), np.ones(n, dtype)
    sgd = SGD([(w, g)], lr=1e-3)
    return _best_seconds(sgd.step, seconds) / n


def _dense_spec(sizes: Sequence[int], dtype: np.dtype) -> object:
    """A dense ReLU model of ``sizes`` with a softmax output, as ``init`` makes it."""
    from mpinn.io.schema import LayerSpec, ModelSpec
    depth = len(sizes) - 1
    return ModelSpec(tuple(sizes), tuple(
        LayerSpec(i, sizes[i - 1], sizes[i], "softmax" if i == depth else "relu", "dense")
        for i in range(1, depth + 1)), dtype)


def _layout_seconds(comm: object, sizes: Sequence[int], batch: int, dtype: np.dtype,
                    lay: Layout, seconds: float,
                    statistic: Callable[[list[float]], float] = statistics.median) -> float:
    """Seconds of one training step of ``lay`` on ``comm``, as ``train`` runs it: R groups
    (``comm.replicas.ReplicaGroups``) of a Q-rank partition of a model of ``sizes`` made in
    memory, each on its share of ``batch``, gradients summed over the groups, the stop
    check over all ranks, the SGD update. By default the median block of steps, the
    slowest rank's: what a run's epochs average, not its best moments. Collective."""
    from mpinn.comm.replicas import ReplicaGroups
    from mpinn.engine.engine import Engine
    from mpinn.optim import SGD
    from mpinn.partition.metadata import MetadataTable
    from mpinn.shard import Shard

    spec = _dense_spec(sizes, dtype)
    q, b = lay.group, -(-batch // lay.replicas)
    if lay.strategy == "layers":
        owners = strategies.by_layers(sizes, q, layer_ranks(sizes, q))
    else:
        owners = strategies.balanced(sizes, q)
    table = MetadataTable.build(sizes, owners, q)
    groups = ReplicaGroups(comm, lay.replicas)
    rank = groups.group.Get_rank()
    engine = Engine(Shard.synthetic(spec, table, rank, q), groups.group, b)
    try:
        if groups.across is not None:
            engine.set_replicas(groups.across)
        sgd = SGD(engine.parameters(), lr=1e-3)
        fused = steps_in_backward(sgd.plain, lay.replicas, lay.micro_batches)  # as train
        rng = np.random.default_rng(0)
        x = rng.random((table.rows(0, rank).size, b)).astype(dtype)
        labels = rng.integers(0, sizes[-1], b)

        def step() -> None:
            if lay.micro_batches > 1:
                engine.pipelined_step(x, labels, None, lay.micro_batches, divisor=batch)
            else:
                engine.loss_and_grad(engine.forward(x), labels, None, batch)
            _stop_check(comm)
            if fused:
                engine.backward(sgd_lr=sgd.lr)
                return
            if lay.micro_batches == 1:
                engine.backward()
            engine.finish_gradients()
            sgd.step()

        return _time_blocks(comm, step, seconds, statistic)
    finally:
        engine.close()
        groups.free()


def _stop_check(comm: object) -> None:
    """train's StepGuard: one allreduce of two flags over all ranks per step."""
    from mpinn.comm.collectives import MAX, allreduce
    allreduce(comm, np.zeros(2, dtype=np.int32), MAX)


def _time_blocks(comm: object, step: Callable[[], None], seconds: float,
                 statistic: Callable[[list[float]], float], steps: int = 10) -> float:
    """Seconds per call of ``step`` (collective), timed in blocks of ``steps`` after one
    block of warm-up, in rounds of about ``seconds`` (``_timed_rounds``), ``statistic``
    over my blocks, the slowest rank's."""
    from mpinn.comm.collectives import MAX, allreduce

    def block() -> None:
        for _ in range(steps):
            step()

    block()
    blocks = [t / steps for t in _timed_rounds(comm, block, seconds)]
    return float(allreduce(comm, np.array([statistic(blocks)]), MAX)[0])


def _timed_rounds(comm: object, action: Callable[[], None], seconds: float) -> list[float]:
    """Seconds of each of as many calls of ``action`` as the first rank to pass ``seconds``
    fits, every rank making as many, each call started with the others (the allreduce that
    ends a round starts the next). Collective."""
    from mpinn.comm.collectives import MIN, allreduce
    rounds, go, start = [], np.ones(1), time.perf_counter()
    allreduce(comm, go, MIN)  # start together
    while go[0]:
        t = time.perf_counter()
        action()
        rounds.append(time.perf_counter() - t)
        go[0] = time.perf_counter() - start < seconds
        allreduce(comm, go, MIN)
    return rounds


def _step_seconds(comm: object, depth: int, dtype: np.dtype, seconds: float) -> float:
    """Seconds of one real training step of a tiny dense model of ``depth`` layers, balanced
    on ``comm``: forward with its exchanges, loss, the per-step stop check, backward and the
    SGD update, in a model too small for its GEMMs or bytes to count. What is left is what
    a step of that depth costs besides them: Python, kernel calls and, with several ranks,
    each exchange's synchronisation. Collective; the slowest rank's best block of steps."""
    size = comm.Get_size()
    return _layout_seconds(comm, [4 * size] * (depth + 1), 8, dtype, Layout(1, size), seconds,
                           statistic=min)


PROBE_SECONDS = 1.0
PROBE_VARIABLE = "MPINN_PROBE_SECONDS"
# ``time_small``'s seconds per layout, as a share of the probe's: partition --plan, --replicas
# auto and train_mlp's plan worker time their short layouts alike
TIME_SHARE = 1 / 3


def probe_seconds() -> float:
    """``probe``'s ``seconds``: ``PROBE_SECONDS``, or ``MPINN_PROBE_SECONDS`` (up to an hour),
    a benchmark knob: a quick run of a benchmark script takes a rougher table sooner."""
    return seconds_from_env(PROBE_VARIABLE, PROBE_SECONDS, most=3600)


def probe(comm: object, sizes: Sequence[int], batch: int, dtype: str = "float32",
          seconds: float = PROBE_SECONDS) -> Machine:
    """Measure a ``Machine`` on the job's ranks, all at once, in a few times ``seconds``.

    GEMM: every rank runs the widest layer's three products (forward, weight and input
    gradient) at the batch width and at 16 samples, at the same time as the others (so
    memory bandwidth is shared as in training), in rounds that start together; the mean
    round's slowest rank gives the rates, which fit ``d_half``.
    The elementwise work per value and the SGD update per parameter, the same way. Fixed
    costs: real steps of a tiny model of the same depth, on one rank (Python per layer and
    pass) and on all of them (each exchange's synchronisation, which sets the latency when
    it exceeds the alltoall's). Links: an alltoall through comm/plans.py of a small and a
    large block per rank pair; with one rank there is nothing to time and the assumed
    shared-memory figures are used. The gradient sum: for every R that divides the ranks,
    the sum training runs (buckets, nonblocking but the last), on the busiest rank's
    gradients up to ``ALLREDUCE_PROBE_BYTES``: Open MPI's allreduce is far from the
    alltoall's bandwidth (a 16-rank Iallreduce of 147 MB ran at 0.7 GB/s where the links
    gave 2.5), so the link figures would predict it two to three times too fast.
    """
    from mpi4py import MPI

    from mpinn.comm.collectives import MAX, allreduce
    from mpinn.comm.probes import time_alltoall

    dt = np.dtype(dtype)
    depth = len(sizes) - 1
    widest = max(range(depth), key=lambda i: sizes[i] * sizes[i + 1])
    m, k = sizes[widest + 1], sizes[widest]
    wide, thin = max(16, min(batch, 1024)), 16
    rates = [_gemm_rate(comm, m, k, wide, dt, seconds), _gemm_rate(comm, m, k, thin, dt, seconds)]
    if wide > thin:
        gflops, d_half = fit_d_half(rates[0], min(m, k, wide), rates[1], min(m, k, thin))
    else:
        gflops, d_half = rates[0], 0.0
    parameters = sum(n_out * (n_in + 1) for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True))
    costs = np.array([_update_seconds(min(parameters, 1 << 23), dt, seconds / 4),
                      _elementwise_seconds(min(max(sizes[1:]), 1024), batch, dt, seconds / 4)])
    allreduce(comm, costs, MAX)
    update, elementwise = (float(c) for c in costs)
    alone = _step_seconds(MPI.COMM_SELF, depth, dt, seconds / 2)
    overhead = float(allreduce(comm, np.array([alone]), MAX)[0]) / (2 * depth)
    size = comm.Get_size()
    if size == 1:
        return Machine(gflops, d_half, ASSUMED_BANDWIDTH, ASSUMED_LATENCY, overhead, update,
                       elementwise, measured_links=False)
    small, large = 64, 1 << 20  # bytes per rank pair
    t_small = time_alltoall(comm, small, seconds / 2)
    t_large = time_alltoall(comm, large, seconds / 2)
    # an alltoall is P - 1 messages of each size per rank, one after another at worst
    bandwidth, latency = fit_link(t_small / (size - 1), small, t_large / (size - 1), large)
    # the tiny model's exchanges on every rank: what they add to its step is latency
    together = _step_seconds(comm, depth, dt, seconds / 2)
    messages = _messages(depth, size)
    latency = max(latency, (together - 2 * depth * overhead) / messages)
    rates = _allreduce_rates(comm, sizes, batch, dt)
    return Machine(gflops, d_half, bandwidth, latency, overhead, update, elementwise,
                   allreduce_rates=rates)


def _allreduce_rates(comm: object, sizes: Sequence[int], batch: int, dtype: np.dtype,
                     cap_bytes: int = ALLREDUCE_PROBE_BYTES) -> tuple[tuple[int, float], ...]:
    """(R, ring bytes/s) of the gradient sum for every R > 1 that divides the ranks: the
    busiest rank's layers of R x Q balanced, scaled down to ``cap_bytes`` when larger, summed
    as training sums them (comm.probes.time_gradient_allreduce). Collective."""
    from mpinn.comm.probes import time_gradient_allreduce

    size = comm.Get_size()
    rates = []
    for r in range(2, min(size, batch) + 1):
        if size % r:
            continue
        values = _rank_values(sizes, size // r)
        scale = min(1.0, cap_bytes / (sum(values) * dtype.itemsize))
        values = [max(1, int(v * scale)) for v in values]
        seconds = time_gradient_allreduce(comm, r, values, dtype)
        rates.append((r, 2.0 * (r - 1) / r * sum(values) * dtype.itemsize / seconds))
    return tuple(rates)
