"""Sparse networks end to end: CLI on real files, partitions that follow the wiring, the
Graph Challenge run and its file converters."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest

from mpinn.comm import topology
from mpinn.io import datafile, schema
from mpinn.partition import strategies
from mpinn.partition.metadata import MetadataTable
from mpinn.partition.traffic import rank_traffic
from mpinn.tools import graphchallenge, sparse_dnn
from tests.helpers import grouped_network
from tests.reference import Reference, assert_close
from tests.system.test_cli import mpinn, ok
from tests.system.test_trace import assert_nested


def _traffic(sizes: list[int], layers: list, strategy: str, nranks: int,
             node: np.ndarray | None = None):
    wiring = strategies.Wiring([np.diff(w.indptr) for w in layers],
                                lambda i: (layers[i - 1].indptr.astype(np.int64),
                                           layers[i - 1].indices.astype(np.int64)))
    owner = strategies.partition(sizes, nranks, strategy, {}, wiring, node)
    spec = schema.ModelSpec(tuple(sizes), tuple(
        schema.LayerSpec(i, sizes[i - 1], sizes[i], "relu", "csr", layers[i - 1].nnz)
        for i in range(1, len(sizes))), np.dtype(np.float32))
    return rank_traffic(spec, MetadataTable.build(sizes, owner, nranks), wiring.layer_edges)


@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_mincut_exchanges_far_less_than_balanced_on_local_wiring(nranks, capsys):
    sizes = [240, 240, 240, 240]
    layers = grouped_network(sizes, groups=nranks, fan_in=8, seed=nranks)
    balanced = _traffic(sizes, layers, "balanced", nranks)
    mincut = _traffic(sizes, layers, "mincut", nranks)
    sent = {name: int(t.forward_send.sum() + t.backward_send.sum())
            for name, t in (("balanced", balanced), ("mincut", mincut))}
    with capsys.disabled():
        print(f"\n  local-by-construction network {sizes}, {nranks} ranks, bytes per sample "
              f"(fwd + bwd): balanced {sent['balanced']:,}, mincut {sent['mincut']:,}; local edges "
              f"{balanced.local_fraction:.0%} vs {mincut.local_fraction:.0%}; imbalance "
              f"{balanced.imbalance:.2f} vs {mincut.imbalance:.2f}")
    # README's figures ("4,696 / 8,992 / 12,536 bytes per sample at 2 / 3 / 4 ranks", local
    # edges 100% against 50% / 33% / 25%, imbalance 1.00 both): the wiring is seeded
    assert sent == {"balanced": {2: 4696, 3: 8992, 4: 12536}[nranks], "mincut": 0}
    assert mincut.local_fraction == 1.0 and round(balanced.local_fraction, 2) == round(1 / nranks, 2)
    assert round(balanced.imbalance, 2) == round(mincut.imbalance, 2) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_node_aware_mincut_puts_the_groups_that_talk_on_one_node(seed):
    """Four groups, each reading a quarter of its inputs from its partner group: METIS's
    parts follow the groups and its recursive bisection numbers partners 2k, 2k+1, which
    block placement (2+2) already keeps together; under cyclic placement (ranks 0, 2 on
    node 0, as ``--map-by node`` puts them) plain mincut sends every value between the
    nodes and the node-aware one none. Both are the same parts, relabelled."""
    sizes = [240, 240, 240, 240]
    layers = grouped_network(sizes, groups=4, fan_in=8, seed=seed, partner_reads=2)

    def between(traffic, node: np.ndarray) -> int:
        return topology.split_by_node(traffic.forward_matrix, node)[0]

    plain = _traffic(sizes, layers, "mincut", 4)
    sent = int(plain.forward_matrix.sum())
    for node in (np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.array([0, 0, 0, 1])):
        aware = _traffic(sizes, layers, "mincut", 4, node)
        assert int(aware.forward_matrix.sum()) == sent  # the same parts
        assert between(aware, node) <= between(plain, node)
        if node.tolist() != [0, 0, 0, 1]:
            assert between(aware, node) == 0, node
    assert between(plain, np.array([0, 1, 0, 1])) == sent > 0


def test_onto_nodes_places_parts_on_nodes_by_their_traffic():
    """Planted: parts 0-3 and 1-2 exchange much, the rest little; 2 nodes of 2 ranks. Random
    small cases (every placement tried): a permutation, the best of every placement (brute
    force here), the identity where that is as good. Beyond ``EXHAUSTIVE_PARTS`` (greedy and
    swaps): 16 parts in planted pairs on 8 nodes of 2 (cyclic numbering) end with no value
    between nodes. One node, or one rank per node: identity."""
    import itertools

    traffic = np.ones((4, 4), dtype=np.int64) + 50 * (np.eye(4)[[3, 2, 1, 0]]).astype(np.int64)
    rank = strategies.onto_nodes(traffic, np.array([0, 0, 1, 1]))
    node = np.array([0, 0, 1, 1])[rank]
    assert node[0] == node[3] and node[1] == node[2] and node[0] != node[1]

    def between(w: np.ndarray, node: np.ndarray, rank: np.ndarray) -> int:
        on = node[rank]
        return int(w[on[:, None] != on[None, :]].sum())

    rng = np.random.default_rng(5)
    for _ in range(60):
        p = int(rng.integers(3, 7))
        node = np.sort(rng.integers(0, int(rng.integers(2, p)), p))
        node = np.unique(node, return_inverse=True)[1]
        t = rng.integers(0, 30, (p, p)) * (rng.random((p, p)) < 0.6)
        np.fill_diagonal(t, 0)
        w = t + t.T
        rank = strategies.onto_nodes(t, node)
        assert sorted(rank.tolist()) == list(range(p))
        best = min(between(w, node, np.array(q)) for q in itertools.permutations(range(p)))
        assert between(w, node, rank) == best
        if between(w, node, np.arange(p)) == best:
            assert np.array_equal(rank, np.arange(p))
    pairs = np.zeros((16, 16), dtype=np.int64)
    for k in range(8):
        pairs[k, k + 8] = pairs[k + 8, k] = 7
    pairs += rng.integers(0, 2, (16, 16))
    np.fill_diagonal(pairs, 0)
    node = np.repeat(np.arange(8), 2)
    rank = strategies.onto_nodes(pairs, node)
    for k in range(8):
        assert node[rank[k]] == node[rank[k + 8]], k
    for node in (np.zeros(5, dtype=np.int64), np.arange(5)):
        assert np.array_equal(strategies.onto_nodes(rng.integers(0, 9, (5, 5)), node),
                              np.arange(5))
    with pytest.raises(schema.MpinnError, match="node list names 3 ranks, the partition has 5"):
        strategies.onto_nodes(np.zeros((5, 5)), np.zeros(3))


def test_nnz_strategy_balances_stored_weights_not_neurons():
    row_nnz = [np.array([10] * 10 + [1] * 90)]
    owner = strategies.by_nnz([5, 100], 2, row_nnz)[5:]
    work = np.bincount(owner, weights=row_nnz[0], minlength=2)
    assert abs(work[0] - work[1]) <= 10
    assert np.all(np.diff(owner) >= 0)  # contiguous blocks


def test_mincut_without_pymetis_says_how_to_install_it(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pymetis(name, *args, **kwargs):
        if name == "pymetis":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pymetis)
    with pytest.raises(schema.MpinnError, match=r"pip install 'mpinn\[partition\]'"):
        strategies.require_pymetis()


def test_sparse_model_trains_and_predicts_from_the_cli(tmp_path):
    model, data, preds = tmp_path / "m.h5", tmp_path / "d.h5", tmp_path / "p.h5"
    ok(mpinn(2, "init", str(model), "--sizes", "20,64,48,5", "--storage", "csr,csr,dense",
             "--fan-in", "6", "--activation", "relu_cap", "--cap", "3", "--seed", "2"))
    ok(mpinn(1, "data", "classification", str(data), "--samples", "60", "--features", "20",
             "--outputs", "5"))
    out = ok(mpinn(3, "partition", str(model), "--ranks", "3", "--compare"))
    for strategy in ("balanced", "nnz", "mincut", "layers"):
        assert re.search(rf"{strategy}\s+fwd\s+[\d,]+ B", out), out
    ok(mpinn(1, "partition", str(model), "--ranks", "3", "--strategy", "mincut", "--name", "mc"))
    out = ok(mpinn(1, "inspect", str(model)))
    assert "relu_cap(3)" in out and "csr" in out and "partition 'mc': strategy mincut" in out
    assert "local edges" in out
    # the replicated table of a 3-rank mincut partition: one byte per neuron at most
    memory = re.search(r"metadata table ([\d,]+) B \(([\d.e+-]+) B per neuron\), rows", out)
    assert memory and float(memory.group(2)) <= 1.0 + 8 * 5 / (20 + 64 + 48 + 5), out
    ok(mpinn(3, "train", str(model), "--data", str(data), "--partition", "mc", "--epochs", "2",
             "--lr", "0.05"))
    with h5py.File(model, "r") as f:  # the wiring is kept: 6 inputs per neuron still
        assert np.array_equal(np.diff(f["layers/1/indptr"][...]), np.full(64, 6))
    ok(mpinn(2, "predict", str(model), "--data", str(data), "--out", str(preds),
             "--strategy", "nnz"))
    with h5py.File(data, "r") as f:
        x = f["X"][...]
    with h5py.File(preds, "r") as f:
        written = f["outputs"][...]
    assert_close(written, Reference.from_file(str(model)).forward(x)[1][-1], "float32", "outputs")


@pytest.mark.parametrize("wiring", [("--fan-in", "5"), ("--density", "0.3")])
def test_sparse_init_under_mpirun_writes_the_same_file_as_one_process(tmp_path, wiring):
    """Wiring and weights come per block of rows from the block's own streams: 1 rank and 3
    ranks (2100 rows: three blocks, one short) must write bitwise the same arrays."""
    files = []
    for nranks in (1, 3):
        files.append(tmp_path / f"{nranks}.h5")
        ok(mpinn(nranks, "init", str(files[-1]), "--sizes", "40,2100,3", "--storage", "csr,dense",
                 *wiring, "--seed", "9"))
    with h5py.File(files[0], "r") as a, h5py.File(files[1], "r") as b:
        for name in ("layers/1/indptr", "layers/1/indices", "layers/1/data", "layers/1/bias",
                     "layers/2/weight", "layers/2/bias"):
            assert np.array_equal(a[name][...], b[name][...]), name
        counts = np.diff(a["layers/1/indptr"][...])
    assert counts.min() > 0 and (wiring[0] == "--density" or np.all(counts == 5))


def test_bad_csr_structure_is_refused_on_every_rank(tmp_path):
    """Each corruption sits in rows that only rank 1 or rank 2 reads: every rank must refuse
    together at the agreed check (one line naming that rank, exit 1), not by a bounded-wait
    abort, and the file must stay as it was."""
    sizes, fan_in = [8, 12, 4], 3
    model = tmp_path / "m.h5"
    ok(mpinn(1, "init", str(model), "--sizes", ",".join(map(str, sizes)), "--storage", "csr",
             "--fan-in", str(fan_in)))
    data = tmp_path / "d.h5"
    datafile.write_data(str(data), np.ones((5, sizes[0]), np.float32), np.arange(5) % sizes[-1])
    owner = strategies.partition(sizes, 3, "balanced")[sizes[0]:sizes[0] + sizes[1]]
    with h5py.File(model, "r") as f:
        indptr, indices = f["layers/1/indptr"][...], f["layers/1/indices"][...]
    assert np.array_equal(indptr, np.arange(0, fan_in * (sizes[1] + 1), fan_in))
    for rank in (1, 2):
        row = int(np.flatnonzero(owner == rank)[1])  # a row of this rank's, not its first
        first = fan_in * row
        for dataset, index, value, message in (
                ("indices", first + 1, 99, "/layers/1/indices holds 99, outside 0..7"),
                ("indices", first + 2, indices[first + 1], "must be strictly ascending within each row"),
                ("indptr", row + 1, indptr[row] - 1, f"/layers/1/indptr decreases (at row {row})")):
            broken = tmp_path / f"broken-{rank}-{dataset}-{index}.h5"
            broken.write_bytes(model.read_bytes())
            with h5py.File(broken, "r+") as f:
                f[f"layers/1/{dataset}"][index] = value
            before = broken.read_bytes()
            result = mpinn(3, "predict", str(broken), "--data", str(data), "--out", str(tmp_path / "o"))
            errors = [ln for ln in result.stderr.splitlines() if ln.startswith("mpinn: error:")]
            assert result.returncode == 1 and len(errors) == 1, result.stderr
            assert message in errors[0] and errors[0].endswith(f"(rank {rank})"), errors
            assert "aborting" not in result.stderr, result.stderr
            assert broken.read_bytes() == before


def independent_categories(model: str, data: str) -> tuple[np.ndarray, np.ndarray]:
    """The categories computed here by tests/reference.py (the samples with a nonzero output),
    and the truth the package stored in the data file."""
    with h5py.File(data, "r") as f:
        x, stored = f["X"][...], np.sort(f["categories"][...])
    outputs = Reference.from_file(model).forward(x.astype(np.float64))[1][-1]
    return np.flatnonzero((outputs != 0).any(axis=1)), stored


@pytest.mark.timeout(630)  # two runs of at most 300 s each
def test_bench_sparse_dnn_finds_the_single_process_categories(tmp_path):
    out = ok(mpinn(2, "bench", "sparse-dnn", "--neurons", "1024", "--layers", "40",
                   "--samples", "200", "--dir", str(tmp_path), "--strategy", "mincut",
                   timeout=300))
    assert "G edges/s" in out and "compute" in out and "communication" in out
    found = re.search(r"categories: (\d+) of 200 samples; single-process truth (\d+): match", out)
    assert found and 0 < int(found.group(1)) < 200, out
    # the network is the challenge's (every layer Y = min(max(W Y - 0.3, 0), 32) for 1024
    # neurons), and the truth the program compares with is what the test computes itself
    model = str(tmp_path / "radixnet-n1024-l40-s0.h5")
    ref = Reference.from_file(model)
    assert set(ref.activations) == {"relu_cap"} and set(ref.caps) == {32.0}
    assert all(np.all(b == np.float32(-0.3)) for b in ref.biases)
    truth, stored = independent_categories(model, str(tmp_path / "radixnet-n1024-l40-s0-inputs200.h5"))
    assert np.array_equal(stored, truth) and int(found.group(1)) == truth.size
    # dropping the samples that die out on the way finds the same categories
    out = ok(mpinn(3, "bench", "sparse-dnn", "--neurons", "1024", "--layers", "40",
                   "--samples", "200", "--dir", str(tmp_path), "--drop-dead", "--batch-size", "64",
                   timeout=300))
    assert "dead samples dropped" in out and f"categories: {found.group(1)} of 200" in out, out


@pytest.mark.timeout(630)  # its subprocesses' own limits, and then some
def test_bench_network_made_under_mpirun_is_the_one_process_network(tmp_path):
    """Ranks write disjoint layers and split the truth by samples: at 1 and 3 ranks the
    files hold the same arrays, and the truth is that of sparse_dnn.infer, layer by layer."""
    n, n_layers, samples = 1024, 7, 90
    files = {}
    trace = tmp_path / "bench.json"
    for nranks in (1, 3):
        directory = tmp_path / str(nranks)
        traced = ["--trace", str(trace), "--batch-size", "32"] if nranks == 3 else []
        out = ok(mpinn(nranks, "bench", "sparse-dnn", "--neurons", str(n), "--layers",
                       str(n_layers), "--samples", str(samples), "--dir", str(directory),
                       *traced, timeout=300))
        assert f"scipy loop on {nranks} processes" in out and "match" in out, out
        files[nranks] = graphchallenge.default_paths(str(directory), n, n_layers, samples, 0)
    # bench --trace: per rank one step per batch of 32, each holding every layer's forward
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert_nested(events)
    for rank in range(3):
        mine = [e for e in events if e["pid"] == rank]
        assert sum(e["name"] == "step" for e in mine) == 3, rank
        layers = {e["name"] for e in mine if e["cat"] == "layer"}
        assert layers == {f"forward {i}" for i in range(1, n_layers + 1)}, layers
    for one, three in zip(files[1], files[3], strict=True):
        with h5py.File(one, "r") as a, h5py.File(three, "r") as b:
            names: list[str] = []
            a.visit(lambda name, names=names: names.append(name))
            for name in names:
                if isinstance(a[name], h5py.Dataset):
                    assert np.array_equal(a[name][...], b[name][...]), name
    # the truth stored is what tests/reference.py computes from the written model and inputs
    computed, stored = independent_categories(*files[3])
    assert np.array_equal(stored, computed) and 0 < computed.size < samples


def test_dropping_dead_samples_is_refused_where_zero_need_not_stay_zero(tmp_path):
    model, data = tmp_path / "m.h5", tmp_path / "d.h5"
    ok(mpinn(1, "init", str(model), "--sizes", "16,8,4", "--storage", "csr", "--fan-in", "4",
             "--output", "softmax"))
    ok(mpinn(1, "data", "classification", str(data), "--samples", "10", "--features", "16",
             "--outputs", "4"))
    with h5py.File(data, "r+") as f:
        f["categories"] = np.arange(3)
    result = mpinn(2, "bench", "sparse-dnn", "--model", str(model), "--data", str(data),
                   "--drop-dead")
    assert result.returncode != 0 and "needs relu or relu_cap layers" in result.stderr, result.stderr


def test_graphchallenge_files_convert_and_run(tmp_path):
    n, n_layers = 64, 5
    layers = [sparse_dnn.radixnet_layer(n, i, fan_in=8, seed=None) for i in range(1, n_layers + 1)]
    # weights k/16 (exact in float32 and in text) and inputs of growing density: some samples
    # reach the last layer and some die out on the way (plain RadiX-Net keeps all or none)
    rng = np.random.default_rng(3)
    for weight in layers:
        weight.data *= rng.integers(0, 9, weight.nnz)
        weight.eliminate_zeros()
    files = []
    for i, weight in enumerate(layers, start=1):
        files.append(str(tmp_path / f"n{n}-l{i}.tsv"))
        sparse_dnn.write_tsv_layer(files[-1], weight)
    y0 = sparse_dnn.sparse_inputs(n, 40, density=0.5, seed=1)
    y0 = y0 * (rng.random(y0.shape) < np.linspace(0.05, 1, 40)[:, None])
    bias = sparse_dnn.challenge_bias(n)
    truth = sparse_dnn.categories(sparse_dnn.infer(layers, bias, y0))
    sparse_dnn.write_tsv_inputs(tmp_path / "images.tsv", y0)
    sparse_dnn.write_categories(tmp_path / "truth.tsv", truth)
    model, data = tmp_path / "m.h5", tmp_path / "d.h5"
    ok(mpinn(1, "import-graphchallenge", *files, "--neurons", str(n), "--inputs",
             str(tmp_path / "images.tsv"), "--categories", str(tmp_path / "truth.tsv"),
             "--samples", "40", "--model", str(model), "--data", str(data)))
    ref = Reference.from_file(str(model))
    for weight, expected in zip(ref.weights, layers, strict=True):
        assert (weight != expected).nnz == 0
    out = ok(mpinn(3, "bench", "sparse-dnn", "--model", str(model), "--data", str(data),
                   "--json"))
    assert f'"categories": {truth.size}' in out and '"correct": true' in out
    # the truth file's categories are also what the test computes from the imported model
    computed, stored = independent_categories(str(model), str(data))
    assert np.array_equal(computed, truth) and np.array_equal(stored, truth)
    assert 0 < truth.size < 40


def test_challenge_truth_is_the_plain_loop():
    n = 64
    layers = [sparse_dnn.radixnet_layer(n, i, fan_in=8) for i in range(1, 4)]
    y0 = sparse_dnn.sparse_inputs(n, 30, density=0.5)
    plain = graphchallenge.plain_inference(iter(layers), -0.3, y0)
    assert np.array_equal(sparse_dnn.categories(plain.T),
                          sparse_dnn.categories(sparse_dnn.infer(layers, -0.3, y0)))
    # both against the challenge's formula written out here, densely
    y = np.asarray(y0, dtype=np.float64)
    for weight in layers:
        y = np.clip(y @ weight.toarray().T - 0.3, 0, 32)
    assert np.array_equal(sparse_dnn.categories(plain.T), np.flatnonzero(y.any(axis=1)))
