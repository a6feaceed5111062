"""The cost model of layouts (mpinn/partition/costmodel.py): pure arithmetic, checked without MPI, plus
its probe on the ranks a test has."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from mpinn.errors import MpinnError
from mpinn.partition import costmodel
from mpinn.partition.costmodel import Layout, Machine

WIDE = [784, 4096, 4096, 4096, 10]
DIGITS = [64, 256, 256, 10]
# about one core of this machine and its shared-memory links
CORE = Machine(gflops=50.0, d_half=32.0, bandwidth=3e9, latency=5e-6)


def test_exchange_bytes_equal_the_formula_of_docs_scaling():
    """balanced on Q ranks: Q ranks together send (Q-1) B s (sum of n_{l-1} forward, l >= 1,
    and backward, l >= 2): the figures of docs/scaling.md's traffic table."""
    sizes = [784, 1024, 1024, 1024, 10]
    for q, megabytes in ((2, 7.09), (4, 21.28)):
        p = costmodel.predict(sizes, 256, 4, Layout(1, q), CORE)
        assert round(q * p.exchange_bytes / 1e6, 2) == megabytes
        forward, backward = sum(sizes[:-1]), sum(sizes[1:-1])
        assert q * p.exchange_bytes == (q - 1) * (forward + backward) * 256 * 4
    assert costmodel.predict(sizes, 256, 4, Layout(4, 1), CORE).exchange_bytes == 0


def test_allreduce_moves_2_r_minus_1_over_r_of_a_ranks_parameters():
    for r, q in ((2, 1), (4, 1), (2, 2), (4, 4)):
        p = costmodel.predict(WIDE, 256, 4, Layout(r, q), CORE)
        rows = [-(-n // q) for n in WIDE[1:]]
        params = sum(m * (n + 1) for m, n in zip(rows, WIDE[:-1], strict=True))
        assert p.rank_parameters == params
        assert p.allreduce_bytes == pytest.approx(2 * (r - 1) / r * params * 4)
        assert p.optimizer == pytest.approx(params * CORE.update)  # each rank updates its rows
    assert costmodel.predict(WIDE, 256, 4, Layout(1, 4), CORE).allreduce == 0


def test_a_measured_gradient_sum_replaces_the_link_estimate_for_its_r():
    """The probe's rate of the gradient sum at R (ring bytes per second) sets that R's
    allreduce term; an R it did not measure keeps the estimate from the links."""
    measured = dataclasses.replace(CORE, allreduce_rates=((2, 1e9),))
    p = costmodel.predict(WIDE, 256, 4, Layout(2, 2), measured)
    assert p.allreduce == pytest.approx(p.allreduce_bytes / 1e9)
    assert p.allreduce > costmodel.predict(WIDE, 256, 4, Layout(2, 2), CORE).allreduce
    assert (costmodel.predict(WIDE, 256, 4, Layout(4, 1), measured).allreduce
            == costmodel.predict(WIDE, 256, 4, Layout(4, 1), CORE).allreduce)


def test_one_rank_costs_the_gemms_alone():
    """R = Q = 1: no exchange, no allreduce; compute is the step's FLOPs at the GEMM rate
    plus the elementwise work of every neuron and sample."""
    fast = dataclasses.replace(CORE, d_half=0.0)
    p = costmodel.predict(WIDE, 256, 4, Layout(1, 1), fast)
    pairs = list(zip(WIDE[:-1], WIDE[1:], strict=True))
    flops = 256 * (sum(6 * a * b for a, b in pairs) - 2 * pairs[0][0] * pairs[0][1])
    assert p.exchange == p.allreduce == 0
    assert p.compute == pytest.approx(flops / 50e9 + sum(WIDE[1:]) * 256 * CORE.elementwise)


def test_predictions_never_grow_with_bandwidth_or_gemm_rate():
    for sizes, batch, ranks in ((WIDE, 256, 4), (DIGITS, 64, 4), (DIGITS, 4096, 6)):
        for lay in costmodel.candidates(ranks, sizes, batch):
            steps = [costmodel.predict(sizes, batch, 4, lay, dataclasses.replace(CORE, bandwidth=bw)).step
                     for bw in (1e8, 1e9, 1e10, 1e11)]
            assert steps == sorted(steps, reverse=True), lay
            if lay.replicas > 1 or lay.group > 1:  # bytes travel: strictly faster
                assert steps[0] > steps[-1], lay
            rates = [costmodel.predict(sizes, batch, 4, lay, dataclasses.replace(CORE, gflops=g)).step
                     for g in (10.0, 50.0, 200.0)]
            assert rates[0] > rates[1] > rates[2], lay


def test_tiny_model_with_a_big_batch_takes_every_rank_as_a_replica():
    for ranks in (2, 4, 16):
        chosen, _ = costmodel.choose(DIGITS, 8192, ranks, CORE)
        assert (chosen.layout.replicas, chosen.layout.group) == (ranks, 1)


def test_wide_layers_at_moderate_batch_keep_one_partitioned_copy():
    for ranks in (2, 4):
        chosen, _ = costmodel.choose(WIDE, 256, ranks, CORE)
        assert chosen.layout == Layout(1, ranks, "balanced"), chosen.layout


def test_a_slow_network_pushes_toward_the_layout_that_sends_least():
    """At 10 MB/s the wide model's activations (balanced) cost more than pipelining whole
    layers, whose one boundary carries a single layer's activations."""
    slow = dataclasses.replace(CORE, bandwidth=1e7)
    fast_choice, _ = costmodel.choose(WIDE, 256, 4, CORE)
    slow_choice, table = costmodel.choose(WIDE, 256, 4, slow)
    assert fast_choice.layout.strategy == "balanced"
    balanced = next(p for p in table if p.layout == Layout(1, 4))
    assert slow_choice.exchange_bytes + slow_choice.allreduce_bytes \
        < balanced.exchange_bytes + balanced.allreduce_bytes
    assert slow_choice.step < balanced.step


def test_the_pipeline_beats_taking_turns_when_compute_dominates():
    """layers on Q ranks unpipelined is serial; micro-batches overlap the stages."""
    turns = costmodel.predict(WIDE, 1024, 4, Layout(1, 2, "layers", 1), CORE)
    piped = costmodel.predict(WIDE, 1024, 4, Layout(1, 2, "layers", 8), CORE)
    assert piped.compute < 0.8 * turns.compute


def test_choose_returns_every_candidate_fastest_first_and_respects_a_memory_bound():
    chosen, table = costmodel.choose(DIGITS, 8192, 4, CORE)
    assert table[0] is chosen and len(table) == len(costmodel.candidates(4, DIGITS, 8192))
    assert [p.step for p in table] == sorted(p.step for p in table)
    whole = sum(a * b + b for a, b in zip(DIGITS, DIGITS[1:], strict=False))
    bounded, table = costmodel.choose(DIGITS, 8192, 4, CORE, max_rank_parameters=whole // 2)
    assert all(p.rank_parameters <= whole // 2 for p in table)
    assert bounded.layout.group >= 2
    # the bounded table printed with its own choice: one line marked, the bounded layout's
    marked = [line for line in costmodel.format_table(bounded, table, 8192).splitlines()
              if "<- chosen" in line]
    assert len(marked) == 1 and marked[0].split()[:2] == str(bounded.layout).split()[:2], marked


def test_candidates_are_every_factorisation_with_a_sample_per_replica():
    lays = costmodel.candidates(12, DIGITS, 4)
    assert {(lay.replicas, lay.group) for lay in lays} == {(4, 3), (3, 4), (2, 6), (1, 12)}
    assert all(lay.group <= 3 for lay in lays if lay.strategy == "layers")
    assert all(lay.micro_batches <= -(-4 // lay.replicas) for lay in lays)


def test_bad_layouts_are_refused_with_a_message():
    with pytest.raises(MpinnError, match="cannot be shared by 8 replicas"):
        costmodel.predict(DIGITS, 4, 4, Layout(8, 1), CORE)
    with pytest.raises(MpinnError, match="micro-batches are for the layers strategy"):
        costmodel.predict(DIGITS, 64, 4, Layout(1, 2, "balanced", 4), CORE)
    with pytest.raises(MpinnError, match="not 'mincut'"):
        costmodel.predict(DIGITS, 64, 4, Layout(1, 2, "mincut"), CORE)
    for ranks in (0, -3, 2**63):
        with pytest.raises(MpinnError, match="layouts of 1 to 1,048,576 ranks"):
            costmodel.choose(DIGITS, 64, ranks, CORE)
    with pytest.raises(MpinnError, match="no layout of 4 ranks fits"):
        costmodel.choose(DIGITS, 64, 4, CORE, max_rank_parameters=1)


def test_fits_recover_the_parameters_of_their_model():
    machine = Machine(gflops=40.0, d_half=24.0, bandwidth=2e9, latency=7e-6)
    rate = [2 * 512 * 512 * d / machine.gemm_seconds(512, 512, d) / 1e9 for d in (256, 16)]
    assert costmodel.fit_d_half(rate[0], 256, rate[1], 16) == pytest.approx((40.0, 24.0))
    small, large = 64, 1 << 20
    got = costmodel.fit_link(machine.message_seconds(small), small, machine.message_seconds(large), large)
    assert got == pytest.approx((2e9, 7e-6))


def test_probe_on_one_rank_measures_gemms_and_assumes_the_links():
    from mpi4py import MPI
    machine = costmodel.probe(MPI.COMM_SELF, [32, 64, 10], 32, "float64", seconds=0.05)
    assert machine.gflops > 0 and machine.d_half >= 0
    # measured, not the defaults: real steps of a 2-layer model, kernels and SGD updates
    # each within a factor of 100 of the assumed figure, and not the assumption itself
    for measured, assumed in ((machine.overhead, costmodel.OVERHEAD_PER_LAYER),
                              (machine.elementwise, costmodel.ELEMENTWISE_PER_VALUE),
                              (machine.update, costmodel.UPDATE_PER_PARAMETER)):
        assert measured != assumed and assumed / 100 < measured < assumed * 100, (measured,
                                                                                 assumed)
    assert not machine.measured_links and machine.bandwidth == costmodel.ASSUMED_BANDWIDTH


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_probe_measures_the_links_on_every_rank_alike():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    machine = costmodel.probe(comm, [32, 64, 10], 32, "float32", seconds=0.1)
    assert machine.measured_links and machine.bandwidth > 0 and machine.latency >= 0
    values = np.array([machine.gflops, machine.d_half, machine.bandwidth, machine.latency,
                       machine.overhead, machine.update, machine.elementwise])
    everyone = comm.allgather(values)
    assert all(np.array_equal(v, values) for v in everyone)
    # the gradient sum timed for every R > 1 that divides the ranks, the same everywhere
    rates = dict(machine.allreduce_rates)
    assert sorted(rates) == [r for r in range(2, comm.size + 1) if comm.size % r == 0]
    assert all(rate > 0 for rate in rates.values())
    assert all(other == machine.allreduce_rates for other in comm.allgather(machine.allreduce_rates))


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(60)
def test_the_gemm_probe_waits_on_each_rounds_slowest_rank(monkeypatch):
    """A step waits on each layer's slowest rank, and on a shared box that is another rank
    each time: here one rank in turn is 20 ms slow per round. Each rank's best time, or the
    slowest rank's mean, would see 0 or 20/P ms of it; the probe must see all 20."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rounds = [0]
    forward = costmodel.kernels.block_forward

    def slow_in_turn(*args):
        if rounds[0] % comm.size == comm.rank:
            time.sleep(0.02)
        rounds[0] += 1
        return forward(*args)

    monkeypatch.setattr(costmodel.kernels, "block_forward", slow_in_turn)
    rate = costmodel._gemm_rate(comm, 8, 8, 8, np.dtype("float64"), 0.3)
    per_round = 3 * 2.0 * 8 ** 3 / (rate * 1e9)
    assert 0.02 <= per_round < 0.04, per_round
    assert all(other == rate for other in comm.allgather(rate))


def test_a_timed_layout_is_predicted_by_its_timing():
    p = costmodel.predict(DIGITS, 64, 4, Layout(2, 1), CORE)
    assert p.step == p.modelled
    timed = dataclasses.replace(p, timed=3 * p.modelled)
    assert timed.step == 3 * p.modelled and timed.modelled == p.modelled


def test_time_small_times_the_short_layouts_of_this_job_only():
    """On one rank: the 1x1 layout is timed (a real step of the model, made in memory),
    layouts of other rank counts and long ones are left modelled; fastest first."""
    from mpi4py import MPI
    table = [costmodel.predict(DIGITS, 16, 4, lay, CORE)
             for lay in (Layout(1, 1), Layout(2, 1), Layout(1, 1, "layers", 2))]
    table.append(costmodel.predict(WIDE, 16, 4, Layout(1, 1), CORE))  # modelled above TIME_BELOW
    assert table[-1].modelled > costmodel.TIME_BELOW
    out = costmodel.time_small(MPI.COMM_SELF, DIGITS, 16, "float32", table, seconds=0.02)
    timed = {str(p.layout): p.timed for p in out if p.timed is not None}
    assert set(timed) == {"1x1 balanced", "1x1 layers M=2"}
    assert all(t > 0 for t in timed.values())
    assert [p.step for p in out] == sorted(p.step for p in out)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_time_small_times_every_layout_of_the_job_alike_on_every_rank():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    table = [costmodel.predict(DIGITS, 16, 4, lay, CORE)
             for lay in costmodel.candidates(comm.size, DIGITS, 16, micro_batches=(1, 2))]
    out = costmodel.time_small(comm, DIGITS, 16, "float64", table, seconds=0.02)
    assert all(p.timed is not None and p.timed > 0 for p in out)
    steps = [(str(p.layout), p.step) for p in out]
    assert all(other == steps for other in comm.allgather(steps))


def test_partition_plan_prints_every_candidate_and_stores_nothing(tmp_path):
    """``partition --plan``: the table with one chosen row and the flags to use; the model
    file is only read."""
    import hashlib
    import subprocess
    import sys

    from tests.system.test_cli import ENV, ROOT
    model = tmp_path / "m.h5"
    subprocess.run([sys.executable, "-m", "mpinn", "init", str(model), "--sizes", "16,32,32,4"],
                   check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=120)
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    out = subprocess.run([sys.executable, "-m", "mpinn", "partition", str(model), "--ranks", "4",
                          "--plan", "--batch-size", "64"], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for row in ("4x1 balanced", "2x2 balanced", "1x4 balanced", "2x2 layers", "2x2 layers M=2"):
        assert f"  {row} " in out.stdout, out.stdout
    assert "1x4 layers" not in out.stdout  # 4 ranks cannot each own one of 3 layers
    assert out.stdout.count("<- chosen") == 1 and "chosen: --replicas " in out.stdout
    assert "links assumed" in out.stdout
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("text, seconds", [("", 1.0), ("0.1", 0.1), (" 2 ", 2.0)])
def test_the_probe_runs_a_second_unless_mpinn_probe_seconds_says_otherwise(monkeypatch, text,
                                                                          seconds):
    monkeypatch.setenv("MPINN_PROBE_SECONDS", text)
    assert costmodel.probe_seconds() == seconds


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "1e9", "fast", "1,5"])
def test_a_probe_time_that_is_not_a_positive_number_of_seconds_is_refused(monkeypatch, text):
    monkeypatch.setenv("MPINN_PROBE_SECONDS", text)
    with pytest.raises(MpinnError, match=r"^MPINN_PROBE_SECONDS must be a positive number of "
                       r"seconds up to 3600, got '.+'$"):
        costmodel.probe_seconds()
