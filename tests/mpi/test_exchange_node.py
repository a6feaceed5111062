"""The two-level ``node`` exchange gives the single-process reference's results, at 1 to 4
ranks, on nodes faked on one host, and sends fewer values between nodes than the Alltoallv.

Nodes are node maps passed to the engine (``topology.block_nodes``, and uneven ones):
1 rank per node (every value goes straight to its reader, through the relay), 2 ranks per
node (proxies forward inside the node), all ranks but the last on one node (3 ranks: 2+1,
4 ranks: 3+1), and the first two ranks on one node, every other rank alone (4 ranks:
2+1+1, where rank 0 relays two owners' values to rank 1). One node is the Alltoallv itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpinn.comm import topology
from mpinn.comm.exchange import make_plans
from mpinn.config import TrainConfig
from mpinn.errors import MpinnError
from mpinn.io import create
from mpinn.io.datafile import load
from mpinn.model import DistributedModel
from mpinn.partition.choice import PartitionChoice
from mpinn.tools.inspect import store_partition
from mpinn.train import train
from tests.helpers import ALL_STRATEGIES, dtypes, grouped_network
from tests.mpi.test_engine import (
    BATCH,
    CASES,
    check_gradients,
    check_prediction,
    choice,
    make_files,
    train_and_compare,
)
from tests.reference import Reference, assert_close

pytestmark = pytest.mark.mpi


def node_map(name: str, size: int) -> np.ndarray:
    """``1``/``2``: that many consecutive ranks per node; ``uneven``: the last rank alone;
    ``pair``: ranks 0 and 1 on node 0, every other rank on a node of its own."""
    if name == "uneven":
        return (np.arange(size) == size - 1).astype(np.int64) if size > 1 else np.zeros(1, int)
    if name == "pair":
        return np.maximum(np.arange(size) - 1, 0)
    return topology.block_nodes(size, int(name))


MAPS = ("1", "2", "uneven", "pair")


def across_nodes(name: str) -> np.ndarray:
    """``node_map(name)`` for this job; skips the test where it puts every rank on one node
    (1 rank; "2" and "pair" at 2 ranks): there the node kinds are the Alltoallv, whose
    results tests/mpi/test_engine.py checks."""
    node = node_map(name, MPI.COMM_WORLD.size)
    if node.max() == 0:
        pytest.skip(f"node map {name!r} is one node at {node.size} rank(s): the Alltoallv")
    return node
# dense, sparse, and both in one model (the regression case is dense like softmax)
MODELS = ("softmax", "sparse", "mixed")


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_node_exchange_trains_the_reference_weights_two_ranks_per_node(strategy, dtype, case,
                                                                       mpi_tmp_path):
    train_and_compare(mpi_tmp_path, case, dtype, strategy, exchange="node",
                      nodes=across_nodes("2"))


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("strategy", ["balanced", "ids", "layers", "mincut"])
@pytest.mark.parametrize("nodes", ["uneven", "pair"])
def test_node_exchange_trains_the_reference_weights_on_other_node_maps(nodes, strategy, case,
                                                                       mpi_tmp_path):
    train_and_compare(mpi_tmp_path, case, "float64", strategy, exchange="node",
                      nodes=across_nodes(nodes))


@pytest.mark.parametrize("case", ["softmax", "mixed"])
@pytest.mark.parametrize("strategy", ["balanced", "layers"])
@pytest.mark.parametrize("nodes", ["1", "pair"])
def test_pipelined_node_exchange_trains_the_reference_weights(nodes, strategy, case,
                                                              mpi_tmp_path):
    train_and_compare(mpi_tmp_path, case, "float64", strategy, 3, exchange="node",
                      nodes=across_nodes(nodes))


@pytest.mark.parametrize("case", ["mixed"])
@pytest.mark.parametrize("strategy", ["balanced", "mincut"])
@pytest.mark.parametrize("nodes", MAPS)
def test_node_exchange_gradients_equal_reference(nodes, strategy, case, mpi_tmp_path):
    check_gradients(mpi_tmp_path, case, strategy, with_targets=True, exchange="node",
                    nodes=across_nodes(nodes))
    MPI.COMM_WORLD.Barrier()


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("dtype", ["float32"])
@pytest.mark.parametrize("strategy", ["balanced", "mincut"])
@pytest.mark.parametrize("nodes", ["2", "pair"])
def test_node_exchange_predicts_the_reference_outputs(nodes, strategy, dtype, case,
                                                      mpi_tmp_path):
    """Inference engines share one set of buffers (the relay too) between all layers."""
    check_prediction(mpi_tmp_path, case, dtype, strategy, training=False, exchange="node",
                     nodes=across_nodes(nodes))


def plans_on(model_path: str, strategy: str, sizes: list[int], nodes: np.ndarray | None,
             exchange: str, comm: MPI.Comm) -> list:
    with DistributedModel(model_path, comm, choice(strategy, sizes, comm.size), BATCH,
                          exchange=exchange, nodes=nodes) as model:
        return model.engine.plans


@pytest.mark.parametrize("case", ["softmax", "mixed"])
@pytest.mark.parametrize("strategy", ["balanced", "layers", "mincut"])
@pytest.mark.parametrize("nodes", MAPS)
def test_node_exchange_sends_no_more_between_nodes_than_alltoallv(nodes, strategy, case,
                                                                 mpi_tmp_path):
    """Counted in the plans, summed over ranks: never more, and strictly less on a dense
    layer where a remote node has 2 ranks reading it (2 ranks per node, 3 or 4 ranks)."""
    comm = MPI.COMM_WORLD
    c = CASES[case]
    node = node_map(nodes, comm.size)
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    direct = plans_on(model_path, strategy, c["sizes"], node, "alltoallv", comm)
    once = plans_on(model_path, strategy, c["sizes"], node, "node", comm)
    multi_node = node.max() > 0
    for i, (a, b) in enumerate(zip(direct, once, strict=True)):
        assert b.kind == ("node" if multi_node else "alltoallv")
        sent_a = comm.allreduce(a.values_between_nodes(node))
        sent_b = comm.allreduce(b.values_between_nodes(node))
        assert sent_b <= sent_a, f"layer {i + 1}"
        assert comm.allreduce(b.node_union_values(node)) == sent_b
        dense = not c.get("storage") or c["storage"][i] == "dense"
        read_whole = comm.allreduce(int(a.reads_whole_layer()), op=MPI.MIN)
        if nodes == "2" and comm.size >= 3 and dense and read_whole:
            assert sent_b < sent_a, f"layer {i + 1}: {sent_b} values between nodes, not fewer"


def test_node_exchange_on_one_node_is_the_alltoallv(mpi_tmp_path):
    """One node (the default on one host, and an explicit one-node map): nothing to relay."""
    comm = MPI.COMM_WORLD
    c = CASES["mixed"]
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    for node in (None, np.zeros(comm.size, dtype=np.int64)):
        plans = plans_on(model_path, "balanced", c["sizes"], node, "node", comm)
        assert [p.kind for p in plans] == ["alltoallv"] * 3


def test_auto_never_picks_a_node_kind(mpi_tmp_path):
    """The node kinds won and lost by turns on the simulated cluster (docs/scaling.md):
    ``auto`` keeps its one-host choice whatever the nodes, also where a node kind would
    halve the values crossing between them (dense layers, 2 ranks per node)."""
    comm = MPI.COMM_WORLD
    c = CASES["softmax"]
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    one_host = [p.kind for p in plans_on(model_path, "balanced", c["sizes"], None, "auto", comm)]
    for name in MAPS:
        node = node_map(name, comm.size)
        kinds = [p.kind for p in plans_on(model_path, "balanced", c["sizes"], node, "auto", comm)]
        assert kinds == one_host


@pytest.mark.parametrize("kind", ["node", "neighbor"])
def test_closing_a_model_frees_the_communicators_its_plans_built(kind, mpi_tmp_path):
    """The node kinds' node communicator and the neighbour kind's graphs live as long as
    the model: its close (and a new engine for a larger batch) frees each once."""
    comm = MPI.COMM_WORLD
    if comm.size < 2:
        pytest.skip("one rank builds no communicator")
    c = CASES["mixed"]
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    with DistributedModel(model_path, comm, choice("balanced", c["sizes"], comm.size), BATCH,
                          exchange=kind, nodes=node_map("1", comm.size)) as model:
        built = [q for p in model.engine.plans for q in (p.graph, p.node_comm) if q is not None]
        assert built, f"{kind}: no communicator built"
        model.use_engine(2 * BATCH, training=True)  # the old engine's go, new ones come
        assert all(q == MPI.COMM_NULL for q in built)
        built = [q for p in model.engine.plans for q in (p.graph, p.node_comm) if q is not None]
    assert built and all(q == MPI.COMM_NULL for q in built)
    assert all(p.graph is None and p.node_comm is None for p in model.engine.plans)


def test_a_node_map_of_the_wrong_size_is_refused(mpi_tmp_path):
    comm = MPI.COMM_WORLD
    c = CASES["softmax"]
    model_path, _, _, _ = make_files(mpi_tmp_path, c, "float64", comm)
    plans = plans_on(model_path, "balanced", c["sizes"], None, "alltoallv", comm)
    table = plans[0].table
    with pytest.raises(MpinnError, match="node map"):
        make_plans(comm, table, [(1, plans[0].inputs)], BATCH, np.float64, exchange="node",
                   nodes=np.zeros(comm.size + 1, dtype=np.int64))


@pytest.mark.parametrize("case", MODELS)
@pytest.mark.parametrize("strategy", ["balanced", "mincut"])
@pytest.mark.parametrize("nodes", ["2", "pair"])
def test_node_forward_trains_the_alltoallvs_weights_bitwise(nodes, strategy, case,
                                                            mpi_tmp_path):
    """``node-forward`` only moves values differently, and sums the backward as the
    Alltoallv does: bitwise the same weights, also pipelined."""
    comm = MPI.COMM_WORLD
    c = CASES[case]
    node = across_nodes(nodes)
    trained = {}
    runs = [(exchange, m) for exchange in ("alltoallv", "node-forward") for m in (1, 3)]
    for exchange, micro_batches in runs:
        model_path, data_path, _, _ = make_files(mpi_tmp_path, c, "float32", comm)
        with DistributedModel(model_path, comm, choice(strategy, c["sizes"], comm.size), BATCH,
                              exchange=exchange, nodes=node) as model:
            kinds = {p.kind for p in model.engine.plans}
            assert exchange == "alltoallv" or node.max() == 0 or "node-forward" in kinds
            data = load(data_path, model.table, model.spec.dtype, comm)
            train(model, data, TrainConfig(epochs=1, batch_size=BATCH, lr=c["lr"],
                                           optimizer=c["optimizer"], momentum=c["momentum"],
                                           seed=11, micro_batches=micro_batches))
        comm.Barrier()
        ref = Reference.from_file(model_path)
        trained[exchange, micro_batches] = [np.asarray(getattr(w, "data", w))
                                            for w in ref.weights] + list(ref.biases)
        comm.Barrier()
    for m in (1, 3):
        for i, (a, b) in enumerate(zip(trained["node-forward", m], trained["alltoallv", m],
                                       strict=True)):
            assert np.array_equal(a, b), f"{m} micro-batches: array {i}"


def test_mincut_places_its_parts_on_the_jobs_nodes(mpi_tmp_path):
    """A network of four groups in two talking pairs (tests/helpers.grouped_network) on
    4 ranks placed cyclically (ranks 0 and 2 on node 0, as ``--map-by node`` puts them):
    ``strategy mincut`` in the job sends nothing between the nodes, where the same parts
    made without the nodes (a stored partition) send every value across; both predict
    the reference's outputs."""
    comm = MPI.COMM_WORLD
    if comm.size != 4:
        pytest.skip("the talking pairs need 4 ranks on 2 nodes")
    sizes = [240, 240, 240, 240]
    model_path = str(mpi_tmp_path / "pairs.h5")
    if comm.rank == 0:
        layers = grouped_network(sizes, groups=4, fan_in=8, seed=1, partner_reads=2)
        create.write_model(model_path, sizes, (create.LayerArrays("relu", w, np.zeros(w.shape[0]))
                                            for w in layers), "float64")
    comm.Barrier()
    store_partition(model_path, 4, "mincut", {}, "plain", comm)  # one host: nodes unknown
    cyclic = np.array([0, 1, 0, 1])
    x = np.random.default_rng(2).normal(size=(BATCH, sizes[0]))
    _, acts = Reference.from_file(model_path).forward(x)
    between = {}
    for name, pick in (("plain", PartitionChoice("plain")),
                       ("aware", PartitionChoice(None, "mincut"))):
        with DistributedModel(model_path, comm, pick, BATCH, training=False, exchange="alltoallv",
                              nodes=cyclic) as model:
            between[name] = comm.allreduce(sum(p.values_between_nodes(cyclic)
                                               for p in model.engine.plans))
            local = x[:, model.table.rows(0, comm.rank)].T.copy()
            out = model.engine.forward(local)
            rows = model.shard.layers[-1].rows
            assert_close(out.T, acts[-1][:, rows], "float64", name)
    assert between["aware"] == 0 < between["plain"], between
