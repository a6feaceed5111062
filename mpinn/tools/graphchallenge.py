"""The Sparse DNN Graph Challenge as an mpinn run: make or import the network, infer, check.

``make_challenge`` writes a RadiX-Net model and its inputs (ranks write disjoint blocks of
layers) with the categories of a plain scipy loop (split over the ranks by samples)
stored beside the inputs;
``import_challenge`` converts the challenge's own TSV files into the same two files;
``run_challenge`` is ``mpinn bench sparse-dnn``: every rank loads its rows, the batch goes
through all layers with the engine, the categories are gathered and checked.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np
from mpi4py import MPI

from mpinn.comm.collectives import MAX, SUM, agree, allreduce, on_root
from mpinn.errors import MpinnError
from mpinn.io import checkpoint, create, datafile, hdf5, schema, staging
from mpinn.io.datafile import load
from mpinn.model import DistributedModel
from mpinn.partition.choice import PartitionChoice
from mpinn.partition.strategies import blockdist
from mpinn.tools import sparse_dnn
from mpinn.trace import NULL, Tracer


def challenge_layers(n: int, n_layers: int, seed: int | None) -> Iterator[create.LayerArrays]:
    """The RadiX-Net layers with the challenge's bias and relu_cap, one at a time."""
    bias = np.full(n, sparse_dnn.challenge_bias(n), dtype=np.float32)
    for layer in range(1, n_layers + 1):
        yield create.LayerArrays("relu_cap", sparse_dnn.radixnet_layer(n, layer, seed=seed), bias,
                              cap=sparse_dnn.CAP)


def _write_inputs(path: str, y0: np.ndarray, truth: np.ndarray, attrs: dict) -> None:
    """The data file: X the inputs; y 1 for a sample in the categories, else 0 (integer
    labels, so the file is also valid for evaluate); ``categories`` the truth itself."""
    labels = np.zeros(y0.shape[0], dtype=np.int64)
    labels[truth] = 1
    datafile.write_data(path, y0, labels, attrs, {"categories": truth.astype(np.int64)})


def challenge_spec(n: int, n_layers: int) -> schema.ModelSpec:
    """The layout of an ``n``-neuron, ``n_layers``-layer RadiX-Net challenge model."""
    layers = tuple(schema.LayerSpec(i, n, n, "relu_cap", "csr", n * sparse_dnn.FAN_IN, sparse_dnn.CAP)
                   for i in range(1, n_layers + 1))
    return schema.ModelSpec((n,) * (n_layers + 1), layers, np.dtype(np.float32))


def make_challenge(model: str, data: str, n: int, n_layers: int, samples: int,
                   seed: int = 0, density: float = 0.2, comm: MPI.Comm = MPI.COMM_SELF) -> float:
    """Write a RadiX-Net model and inputs, with the categories of a plain scipy loop as truth
    (collective over ``comm``).

    Each rank generates and writes a contiguous block of the layers (a layer is computable
    alone, so the file is the same whatever the rank count); then each rank runs the plain
    scipy loop, reading every layer from the file, on a block of the samples (samples are
    independent, so the categories are those of one process doing all of them). Returns
    the seconds that loop took on the slowest rank: the single-process baseline when
    ``comm`` has one rank.
    """
    sparse_dnn.radix_plan(n)  # refuse a size before anything is written, alike on every rank
    bias = sparse_dnn.challenge_bias(n)
    count, first = blockdist(n_layers, comm.size, comm.rank)
    with checkpoint.Checkpoint(model, challenge_spec(n, n_layers), {}, comm) as f:
        for layer in range(first + 1, first + count + 1):
            weight = sparse_dnn.radixnet_layer(n, layer, seed=seed)
            group = f[f"layers/{layer}"]
            group["indptr"][...] = weight.indptr.astype(np.int64)
            group["indices"][...] = weight.indices
            group["data"][...] = weight.data
            group["bias"][...] = np.full(n, bias, dtype=np.float32)
        schema.write_state_attrs(f, {"epoch": 0, "step": 0, "batch": 0})
    # rank 0 draws the inputs (the draw is not prefix-stable) and hands each rank its block
    y0 = sparse_dnn.sparse_inputs(n, samples, density, seed) if comm.rank == 0 else None
    counts = np.array([blockdist(samples, comm.size, r)[0] for r in range(comm.size)])
    first = int(counts[:comm.rank].sum())
    mine = np.empty((int(counts[comm.rank]), n), dtype=np.float32)
    comm.Scatterv([y0, counts * n, (np.cumsum(counts) - counts) * n, MPI.FLOAT]
                  if comm.rank == 0 else None, mine, root=0)
    comm.Barrier()
    started = time.perf_counter()
    y = agree(comm, lambda: plain_inference(model_layers(model), bias, mine))
    seconds = allreduce(comm, np.array([time.perf_counter() - started]), MAX)[0]
    truth = np.concatenate(comm.allgather(sparse_dnn.categories(y.T) + first))
    on_root(comm, lambda: _write_inputs(data, y0, truth, {"neurons": n, "layers": n_layers,
                                                          "seed": seed, "density": density}))
    return float(seconds)


def model_layers(path: str) -> Iterator:
    """The weights of a model file, one layer at a time (for the single-process baseline)."""
    with hdf5.opened(path, "r", MPI.COMM_SELF) as f:
        for ly in schema.read_spec(f).layers:
            yield schema.read_layer(f, ly)[0]


def plain_inference(layers: Iterator, bias: float, y0: np.ndarray) -> np.ndarray:
    """The plain scipy.sparse loop: Z = W @ Y + b, clip to [0, 32], every layer and sample.

    Neuron-major (W @ Y, Y (n, samples)), the fastest layout for scipy's CSR kernels.
    Returns Y of the last layer, (n, samples).
    """
    y = np.ascontiguousarray(y0.T, dtype=np.float32)
    for weight in layers:
        y = weight @ y
        y += np.float32(bias)
        np.clip(y, 0, sparse_dnn.CAP, out=y)
    return y


def import_challenge(layer_files: list[str], n: int, inputs: str, categories: str | None,
                     model: str, data: str, samples: int | None = None) -> None:
    """Convert the challenge's TSV files (one per layer, 1-based ``row col value``, W as
    input x output) and its inputs and truth categories into a model and a data file.

    The inputs and categories are read and checked first; both outputs are written under
    temporary names and appear only once both are complete."""
    bias = np.full(n, sparse_dnn.challenge_bias(n), dtype=np.float32)
    y0 = sparse_dnn.read_tsv_inputs(inputs, n, samples, hdf5.available_memory())
    truth = None
    if categories is not None:
        truth = sparse_dnn.read_categories(categories)
        if truth.size and truth.max() >= y0.shape[0]:
            raise MpinnError(f"{categories}: category {truth.max() + 1} is beyond the "
                             f"{y0.shape[0]} samples of {inputs}")
    layers = (create.LayerArrays("relu_cap", sparse_dnn.read_tsv_layer(path, n), bias,
                              cap=sparse_dnn.CAP) for path in layer_files)
    with staging.staged(model) as model_partial, staging.staged(data) as data_partial:
        create.write_model(model_partial, [n] * (len(layer_files) + 1), layers, "float32")
        if truth is None:
            truth = sparse_dnn.categories(plain_inference(model_layers(model_partial), bias[0], y0).T)
        _write_inputs(data_partial, y0, truth, {"neurons": n, "layers": len(layer_files)})


def check_room(directory: str, n: int, n_layers: int, samples: int) -> None:
    """Refuse a generated challenge network that cannot fit the disk or memory, before any
    of it is made: its weights (n x FAN_IN per layer), inputs and the truth's activations."""
    create.check_space(os.path.join(directory, "network.h5"),
                    n_layers * n * sparse_dnn.FAN_IN * 8 + 2 * samples * n * 4,
                    n * sparse_dnn.FAN_IN * 24 + 3 * samples * n * 4,
                    f"bench sparse-dnn's network of {n} neurons x {n_layers} layers and "
                    f"{samples} samples")


@dataclass
class ChallengeResult:
    """What ``bench sparse-dnn`` measured: the wall time of the slowest rank, its split
    averaged over the ranks."""

    neurons: int         # of the first layer
    layers: int
    samples: int
    edges: int           # stored weights over all layers
    seconds: float       # inference wall time, all batches
    compute: float
    pack: float
    wait: float
    load: float          # reading the rows and inputs, computing the partition
    dropped: bool        # whether dead samples were dropped as they died
    found: np.ndarray    # the categories mpinn computed
    truth: np.ndarray    # the ones stored with the inputs
    peak_rss: int = 0    # bytes, the largest rank's peak resident set
    rows_bytes: int = 0  # bytes of the largest rank's rows (weights, biases, their indices)
    metadata_bytes: int = 0  # bytes of the replicated metadata table, on every rank

    @property
    def edges_per_second(self) -> float:
        return self.samples * self.edges / self.seconds

    @property
    def correct(self) -> bool:
        return np.array_equal(self.found, self.truth)


def run_challenge(model: str, data: str, comm: MPI.Comm, choice: PartitionChoice,
                  batch_size: int, drop_dead: bool = False, exchange: str = "auto",
                  trace: str | None = None) -> ChallengeResult:
    """Inference of every sample through every layer on all ranks, then the categories.

    With ``drop_dead`` samples whose activations die out are dropped as they die (the
    work the challenge's sparse reference does); edges/s still counts every sample.
    ``trace``: write the timed loop's spans there (``mpinn.trace``), a "step" per batch.
    """
    comm.Barrier()
    started = time.perf_counter()
    with DistributedModel(model, comm, choice, batch_size, training=False,
                          exchange=exchange) as dm:
        local = load(data, dm.table, dm.spec.dtype, comm)
        with hdf5.opened(data, "r", MPI.COMM_SELF) as f:  # small: every rank reads it whole
            truth = agree(comm, lambda: _truth(f, data))
        load_seconds = time.perf_counter() - started
        alive = np.zeros(local.n_samples, dtype=np.int64)
        features = np.empty((local.features.shape[0], batch_size), dtype=dm.spec.dtype)
        engine = dm.engine
        tracer = Tracer(comm) if trace is not None else NULL
        engine.set_tracer(tracer)
        comm.Barrier()
        started = time.perf_counter()
        for first in range(0, local.n_samples, batch_size):
            with tracer.span("step", "step"):
                index = np.arange(first, min(first + batch_size, local.n_samples))
                x, _, _ = local.batch(index, features)
                outputs = engine.forward(x, drop_dead)
                if outputs.shape[0]:
                    alive[index[engine.live]] = outputs.any(axis=0)
        allreduce(comm, alive, MAX)  # a sample is in the categories if any rank's rows fire
        seconds = allreduce(comm, np.array([time.perf_counter() - started]), MAX)[0]
        if trace is not None:
            tracer.write(trace)
        split = np.array([engine.seconds_compute, sum(p.seconds_pack for p in engine.plans),
                          sum(p.seconds_wait for p in engine.plans), load_seconds])
        allreduce(comm, split, SUM)
        rows_bytes = sum(sum(v.nbytes for v in vars(layer).values() if isinstance(v, np.ndarray))
                         for layer in dm.shard.layers)
        memory = allreduce(comm, np.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           * 1024, rows_bytes]), MAX)
    edges = sum(ly.nnz for ly in dm.spec.layers)
    return ChallengeResult(dm.spec.sizes[0], len(dm.spec.layers), local.n_samples, edges,
                           float(seconds), *map(float, split / comm.size), drop_dead,
                           np.flatnonzero(alive), truth, int(memory[0]), int(memory[1]),
                           dm.table.nbytes)


def _truth(f: h5py.File, path: str) -> np.ndarray:
    if "categories" not in f:
        raise MpinnError(f"{path}: no 'categories' dataset (make it with mpinn bench sparse-dnn "
                         "or mpinn import-graphchallenge)")
    return np.sort(hdf5.read_whole(f["categories"]).astype(np.int64))


def challenge_report(result: ChallengeResult, nranks: int) -> str:
    """The lines ``bench sparse-dnn`` prints."""
    other = result.seconds - result.compute - result.pack - result.wait
    verdict = ("match" if result.correct else
               f"MISMATCH ({np.setxor1d(result.found, result.truth).size} samples differ)")
    return "\n".join([
        f"sparse-dnn N={result.neurons} L={result.layers}: {result.samples} samples, {result.edges:,} edges, "
        f"{nranks} ranks" + (", dead samples dropped" if result.dropped else ""),
        f"  {result.edges_per_second / 1e9:.3f} G edges/s  ({result.seconds:.3f} s)",
        f"  time (mean over ranks): compute {result.compute:.3f} s, pack {result.pack:.3f} s, "
        f"communication and waiting {result.wait:.3f} s, python and the rest {max(other, 0):.3f} s; "
        f"load (I/O and partition) {result.load:.3f} s",
        f"  memory per rank: peak RSS {result.peak_rss / 2**20:.0f} MiB, rows "
        f"{result.rows_bytes / 2**20:.1f} MiB, metadata table {result.metadata_bytes:,} B (largest rank)",
        f"  categories: {result.found.size} of {result.samples} samples; single-process truth "
        f"{result.truth.size}: {verdict}"])


def challenge_json(result: ChallengeResult, nranks: int) -> str:
    """The same figures as one JSON object (``--json``), for scripts and the benchmark."""
    import json
    return json.dumps({"neurons": result.neurons, "layers": result.layers, "ranks": nranks,
                       "samples": result.samples, "edges": result.edges,
                       "seconds": result.seconds, "edges_per_second": result.edges_per_second,
                       "compute": result.compute, "pack": result.pack, "wait": result.wait,
                       "load": result.load, "drop_dead": result.dropped, "categories": int(result.found.size),
                       "peak_rss": result.peak_rss, "rows_bytes": result.rows_bytes,
                       "metadata_bytes": result.metadata_bytes,
                       "correct": result.correct})


def default_paths(directory: str, n: int, n_layers: int, samples: int, seed: int) -> tuple[str, str]:
    """Where ``bench sparse-dnn`` keeps the network it generates (reused when present)."""
    stem = os.path.join(directory, f"radixnet-n{n}-l{n_layers}-s{seed}")
    return f"{stem}.h5", f"{stem}-inputs{samples}.h5"
