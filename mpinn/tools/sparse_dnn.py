"""Helpers for the MIT/IEEE/Amazon GraphChallenge Sparse Deep Neural Network benchmark.

Pure numpy/scipy, no MPI and none of mpinn's own file format, so every piece is testable
in a plain process and usable as the single-process reference:

* RadiX-Net layers (Robinett & Kepner 2019, "RadiX-Net: Structured Sparse Matrices for
  Deep Neural Networks", arXiv:1905.00416), the wiring of the challenge's networks, one
  layer at a time so that a network of any depth is never held whole;
* image-like binary inputs that keep some but not all samples alive through 120 layers;
* the challenge's inference rule Y_l = min(max(Y_{l-1} W_l + b, 0), 32) and its
  categories (the samples whose last row has a nonzero);
* reading and writing the challenge's published TSV files.

Convention. The challenge writes a layer as W[input neuron, output neuron]; mpinn, and
every matrix here, stores it transposed: shape (n_out, n_in), one CSR row per receiving
neuron. The TSV readers and writers do the transposition, nothing else does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from mpinn.errors import MpinnError

CHALLENGE_BIAS: dict[int, float] = {1024: -0.30, 4096: -0.35, 16384: -0.40, 65536: -0.45}
CAP = 32.0
WEIGHT = 1.0 / 16
FAN_IN = 32
DEFAULT_BIAS = -0.30
STROKE = 32  # mean length of an input stroke (active pixels in a row), see sparse_inputs

_LAYER_STREAM = 1  # second word of the SeedSequence of a layer's relabelling: never equal to
_INPUT_STREAM = 2  # that of the inputs, whatever the seed


def challenge_bias(n: int) -> float:
    """The challenge's bias for ``n`` neurons per layer; -0.30 for a power of two not in it.

    The challenge only publishes 1024, 4096, 16384 and 65536 neurons. Other powers of two
    (>= 32) are allowed so that small and odd-sized test networks can be built; they get
    -0.30, the value of the smallest challenge network.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 32 or n & (n - 1):
        raise MpinnError(f"challenge_bias: neurons per layer must be a power of two >= 32, got {n!r} "
                         f"(the challenge's are {', '.join(map(str, CHALLENGE_BIAS))})")
    return CHALLENGE_BIAS.get(int(n), DEFAULT_BIAS)


def _check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int >= ``low``, or a MpinnError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MpinnError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _is_power(value: int, base: int) -> bool:
    """True if ``value`` is ``base`` ** k for some k >= 1."""
    if value < base:
        return False
    while value % base == 0:
        value //= base
    return value == 1


def radix_plan(n: int, fan_in: int = FAN_IN) -> tuple[int, int, int]:
    """(radix, block, digits) of the RadiX-Net of ``n`` neurons and ``fan_in`` inputs each.

    The net is a mixed-radix topology on n / block "super-neurons", Kronecker-multiplied
    by a dense block x block matrix (the paper's dense widths): n = block * radix**digits
    and fan_in = radix * block. The largest radix that fits is taken, so the plain
    circulant net (block 1) is used whenever it exists: 1024 -> (32, 1, 2),
    4096 -> (2, 16, 8), 16384 -> (8, 4, 4), 65536 -> (2, 16, 12).
    """
    n = _check_int("n", n, 1)
    fan_in = _check_int("fan_in", fan_in, 2)
    if fan_in > n:
        raise MpinnError(f"fan_in {fan_in} is larger than the {n} neurons of a layer")
    for radix in range(fan_in, 1, -1):
        if fan_in % radix:
            continue
        block = fan_in // radix
        if n % block == 0 and _is_power(n // block, radix):
            return radix, block, round(math.log(n // block, radix))
    raise MpinnError(f"no RadiX-Net has {n} neurons and {fan_in} inputs per neuron: n must be "
                     f"block * radix**k with radix * block = fan_in (any power of two n >= fan_in "
                     f"works for a power-of-two fan_in)")


def _relabelling(n: int, layer: int, seed: int) -> np.ndarray:
    """The seeded order of layer ``layer``'s neurons; layer 0 (the inputs) keeps its own."""
    if layer == 0:
        return np.arange(n)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _LAYER_STREAM, layer]))
    return rng.permutation(n)


def radixnet_layer(n: int, layer: int, fan_in: int = FAN_IN, seed: int | None = 0) -> sp.csr_matrix:
    """Weight of layer ``layer`` (1-based) of an ``n``-neuron RadiX-Net, rows = receiving neurons.

    Mixed-radix topology (Robinett & Kepner 2019): with (radix, block, digits) from
    ``radix_plan``, layer l uses the place value s = radix**((l - 1) % digits), and the
    input neuron in super-neuron u (= neuron // block) feeds every neuron of super-neurons
    (u + k * s) mod (n / block), k = 0..radix-1: a sum of cyclic shifts (circulant), times
    a dense block. For 1024 neurons that is strides 1 and 32, 32 inputs each. Any
    ``digits`` consecutive layers connect every input to every output by the same number
    of paths (one when block is 1): structured, even mixing, which is what keeps activity
    alive where random wiring lets it die.

    With an integer ``seed`` the neurons of every hidden layer are renumbered by a seeded
    permutation (layer l's rows and layer l+1's columns alike; the input features keep
    their order), so the matrices look unstructured, as partitioners meet them, while the
    network computes the same thing up to the order of the final outputs (categories are
    unchanged). ``seed=None`` gives the plain circulant layers. Only this layer's two
    permutations are drawn: each layer is computable alone.

    Returns a canonical CSR (sorted, no duplicates) of shape (n, n), exactly ``fan_in``
    nonzeros per row and per column, all ``WEIGHT``, float32 data and int32 indices;
    scipy keeps indptr and indices of one dtype, so indptr is int32 too.
    """
    layer = _check_int("layer", layer, 1)
    radix, block, digits = radix_plan(n, fan_in)
    if seed is not None:
        seed = _check_int("seed", seed, 0)
    supers = n // block
    stride = radix ** ((layer - 1) % digits)
    receiver = np.arange(n)
    if seed is not None:  # the plain row that relabelled row o' holds: the inverse permutation
        receiver = np.argsort(_relabelling(n, layer, seed))
    source = (receiver[:, None] // block - np.arange(radix)[None, :] * stride) % supers
    columns = (source[:, :, None] * block + np.arange(block)[None, None, :]).reshape(n, fan_in)
    if seed is not None:
        columns = _relabelling(n, layer - 1, seed)[columns]
    columns.sort(axis=1)
    indptr = np.arange(0, n * fan_in + 1, fan_in, dtype=np.int64)
    weight = sp.csr_matrix((np.full(n * fan_in, WEIGHT, dtype=np.float32),
                            columns.ravel().astype(np.int32), indptr), shape=(n, n))
    weight.has_sorted_indices = True
    weight.has_canonical_format = True
    return weight


def sparse_inputs(n: int, samples: int, density: float = 0.2, seed: int = 0) -> np.ndarray:
    """(samples, n) float32 binary inputs: image-like horizontal strokes, ``density`` on.

    Every sample has exactly round(density * n) active pixels, in about that / ``STROKE``
    (32) non-overlapping runs of consecutive features whose lengths and gaps are random
    (uniform compositions). The challenge feeds MNIST digits, whose pixels cluster;
    clustering is what lets a RadiX-Net's first circulant layer see full windows, while
    i.i.d. pixels (or random wiring, which scatters any cluster) starve every neuron
    alike and die. Random wiring therefore leaves no sample alive at this density, and
    the RadiX-Net a mix that depends on each sample's stroke layout.

    Measured (``radixnet_layer(1024, l)`` for l = 1..120, bias -0.30, cap 32, seed 0):
    142 of 500 samples and 639 of 2000 survive at the defaults; with 32 random inputs per
    neuron instead, 0 of 500. Other sizes have other plans and biases (see ``radix_plan``):
    at 4096 (radix 2, blocks of 16) every sample survives even at density 0.08, at 16384
    none does at 0.2 and a mix does near 0.26. The generation is not prefix-stable: the
    first k of m samples differ from ``sparse_inputs(n, k)``.
    """
    n = _check_int("n", n, 1)
    samples = _check_int("samples", samples, 0)
    seed = _check_int("seed", seed, 0)
    if not 0.0 <= density <= 1.0:
        raise MpinnError(f"density must be within [0, 1], got {density!r}")
    active = round(density * n)
    out = np.zeros((samples, n), dtype=np.float32)
    if active == 0 or samples == 0:
        return out
    strokes = max(1, min(active, round(active / STROKE)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, _INPUT_STREAM]))
    chunk = max(1, (1 << 24) // (n + 1))  # bounds the int8 scratch to 16 MiB
    for first in range(0, samples, chunk):
        rows = min(chunk, samples - first)
        lengths = 1 + rng.multinomial(active - strokes, rng.dirichlet(np.ones(strokes), size=rows))
        gaps = rng.multinomial(n - active, rng.dirichlet(np.ones(strokes + 1), size=rows))[:, :strokes]
        starts = np.cumsum(gaps, axis=1) + np.cumsum(lengths, axis=1) - lengths
        edges = np.zeros((rows, n + 1), dtype=np.int8)
        row_of = np.repeat(np.arange(rows), strokes)
        np.add.at(edges, (row_of, starts.ravel()), 1)
        np.add.at(edges, (row_of, (starts + lengths).ravel()), -1)
        np.cumsum(edges[:, :n], axis=1, dtype=np.float32, out=out[first:first + rows])
    return out


def infer(layers: Iterable[sp.csr_matrix], bias: float, y0: np.ndarray, cap: float = CAP) -> np.ndarray:
    """Single-process challenge inference: Y = min(max(Y @ W.T + bias, 0), cap) per layer.

    ``layers`` are in mpinn's convention (rows = receiving neurons) and are consumed one
    at a time, so a generator keeps only one layer in memory. ``y0`` is (samples, n).
    Returns the final (samples, n_out) float32 Y. Internally the activations are kept
    neuron-major (one scipy CSR x dense product per layer) and, when bias <= 0, samples
    whose row is all zero are dropped: zero in gives max(bias, 0) = 0 out forever after.
    """
    y = np.asarray(y0, dtype=np.float32)
    if y.ndim != 2:
        raise MpinnError(f"infer: y0 must be (samples, n), got shape {y.shape}")
    samples = y.shape[0]
    x = np.ascontiguousarray(y.T)  # (n, samples): a layer is then W @ x
    alive = np.arange(samples)
    prune = bias <= 0
    for number, weight in enumerate(layers, start=1):
        weight = sp.csr_matrix(weight, dtype=np.float32)
        if weight.shape[1] != x.shape[0]:
            raise MpinnError(f"infer: layer {number} has {weight.shape[1]} inputs, "
                             f"the previous layer gives {x.shape[0]}")
        x = np.asarray(weight @ x, dtype=np.float32)
        x += np.float32(bias)
        np.clip(x, 0, cap, out=x)
        if prune and alive.size:
            live = x.any(axis=0)
            if not live.all():
                x = np.ascontiguousarray(x[:, live])
                alive = alive[live]
    result = np.zeros((samples, x.shape[0]), dtype=np.float32)
    result[alive] = x.T
    return result


def categories(y: np.ndarray) -> np.ndarray:
    """Sorted int64 indices of the rows of ``y`` with any nonzero: the challenge's answer."""
    return np.flatnonzero(np.asarray(y).any(axis=1)).astype(np.int64)


# ---------------------------------------------------------------- GraphChallenge TSV files


_TRIPLE = np.dtype([("row", np.int64), ("col", np.int64), ("value", "S32")])
_LAST_VALUE_BYTE = _TRIPLE.fields["value"][1] + 31  # nonzero: the spelling may be cut short


def _data_lines(path: str | Path) -> np.ndarray:
    """1-based numbers of the non-blank lines of a file: row i of its table is on line [i]."""
    lines = Path(path).read_text().split("\n")
    return np.array([i + 1 for i, line in enumerate(lines) if line.strip()], dtype=np.int64)


def _bad_line(path: str | Path, layout: str, error: Exception) -> MpinnError:
    """The error for the first line of ``path`` that is not ``int int float``."""
    for number, line in enumerate(Path(path).read_text().split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 3 or max(abs(int(fields[0])), abs(int(fields[1]))) >= 2**62:
                raise ValueError
            float(fields[2])
        except ValueError:
            return MpinnError(f"{path}:{number}: expected {layout}, got {line.strip()!r}")
    return MpinnError(f"{path}: not a {layout} file ({error})")


def _read_triples(path: str | Path, names: tuple[str, str], bounds: tuple[int | None, int],
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) of a ``row<TAB>col<TAB>value`` file, 0-based int64 indices.

    ``names`` say what rows and columns index (for messages), ``bounds`` their largest
    allowed 1-based value (None: no limit). A malformed line, an index out of range, a
    non-finite value or a repeated (row, col) is a MpinnError naming the file and the
    1-based line of an offending entry. Values are parsed once per distinct spelling when
    all lines agree (the challenge's layers are all "0.0625"), which is most of the time.
    """
    layout = f"'{names[0]}<TAB>{names[1]}<TAB>value'"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy's "empty input file": no entries
            table = np.loadtxt(path, dtype=_TRIPLE, comments=None, ndmin=1)
        text = table["value"]
        if not text.size:
            values = np.zeros(0, np.float64)
        elif table.view(np.uint8).reshape(text.size, -1)[:, _LAST_VALUE_BYTE].any():
            values = np.loadtxt(path, dtype=np.float64, comments=None, usecols=(2,), ndmin=1)
        elif (text == text[0]).all():
            values = np.full(text.size, float(text[0]))
        else:
            values = text.astype(np.float64)
    except (ValueError, OverflowError) as error:
        raise _bad_line(path, layout, error) from None
    rows, cols = table["row"], table["col"]
    for name, column, top in zip(names, (rows, cols), bounds, strict=True):
        inside = (column >= 1) & (column <= (np.iinfo(np.int64).max if top is None else top))
        if not inside.all():
            at = int(np.argmin(inside))
            allowed = "1 and up" if top is None else f"1..{top}"
            raise MpinnError(f"{path}:{_data_lines(path)[at]}: {name} index {column[at]} "
                             f"is outside {allowed}")
    finite = np.isfinite(values)
    if not finite.all():
        at = int(np.argmin(finite))
        raise MpinnError(f"{path}:{_data_lines(path)[at]}: value {values[at]!r} is not finite")
    rows, cols = rows - 1, cols - 1
    key = rows * (int(cols.max(initial=0)) + 1) + cols
    order = np.argsort(key, kind="stable")
    repeated = key[order][1:] == key[order][:-1]
    if repeated.any():
        at = int(order[1:][repeated].min())
        first = int(order[np.searchsorted(key[order], key[at])])
        line_of = _data_lines(path)
        raise MpinnError(f"{path}:{line_of[at]}: duplicate entry ({names[0]} {rows[at] + 1}, {names[1]} "
                         f"{cols[at] + 1}), first given on line {line_of[first]}")
    return rows, cols, values.astype(np.float32)


def _csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Canonical float32 CSR from distinct (row, col) triples, int32 indices where they fit."""
    order = np.lexsort((cols, rows))
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    matrix = sp.csr_matrix((values[order], cols[order].astype(np.int32), indptr), shape=shape)
    matrix.has_sorted_indices = True
    matrix.has_canonical_format = True
    return matrix


def read_tsv_layer(path: str | Path, n: int) -> sp.csr_matrix:
    """One challenge layer file (``n1024-l1.tsv``: input<TAB>output<TAB>weight, 1-based).

    Returned in mpinn's convention, transposed: (n, n) with rows = output neurons,
    canonical, float32 data, int32 indices. Bad lines raise MpinnError (file and line).
    """
    n = _check_int("n", n, 1)
    inputs, outputs, values = _read_triples(path, ("input", "output"), (n, n))
    return _csr(outputs, inputs, values, (n, n))


def _triple_lines(rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> str:
    """``row<TAB>col<TAB>value`` lines, 1-based; each distinct value spelled once, float32-exact."""
    distinct, which = np.unique(values, return_inverse=True)
    spelled = [f"{value:.9g}" for value in distinct.tolist()]
    return "".join([f"{r + 1}\t{c + 1}\t{spelled[k]}\n"
                    for r, c, k in zip(rows.tolist(), cols.tolist(), which.ravel().tolist(), strict=True)])


def write_tsv_layer(path: str | Path, weight: sp.csr_matrix) -> None:
    """Write a layer (mpinn convention, rows = outputs) as the challenge's TSV, transposed.

    Lines are ordered by input neuron, then output neuron; explicit zeros are written too.
    """
    coo = sp.csr_matrix(weight).tocoo()
    order = np.lexsort((coo.row, coo.col))
    Path(path).write_text(_triple_lines(coo.col[order], coo.row[order], coo.data[order]))


def read_tsv_inputs(path: str | Path, n: int, samples: int | None = None,
                    max_bytes: int | None = None) -> np.ndarray:
    """The challenge's input file (``sparse-images-1024.tsv``: sample<TAB>feature<TAB>value).

    Returns (samples, n) float32; ``samples`` defaults to the largest sample index in the
    file (trailing all-zero samples are then lost: pass it when it is known). An array
    larger than ``max_bytes`` is refused before it is allocated.
    """
    n = _check_int("n", n, 1)
    if samples is not None:
        samples = _check_int("samples", samples, 0)
    rows, cols, values = _read_triples(path, ("sample", "feature"), (samples, n))
    if samples is None:
        samples = int(rows.max()) + 1 if rows.size else 0
    if max_bytes is not None and samples * n * 4 > max_bytes:
        raise MpinnError(f"{path}: sample index {samples:,} with {n} features needs a "
                         f"{samples * n * 4 / 2**30:,.1f} GiB input array, more than this "
                         f"machine's memory; pass --samples or check the file")
    y = np.zeros((samples, n), dtype=np.float32)
    y[rows, cols] = values
    return y


def write_tsv_inputs(path: str | Path, y0: np.ndarray) -> None:
    """Write the nonzeros of (samples, n) ``y0`` as the challenge's input TSV, row-major."""
    y = np.asarray(y0)
    if y.ndim != 2:
        raise MpinnError(f"write_tsv_inputs: y0 must be (samples, n), got shape {y.shape}")
    rows, cols = np.nonzero(y)
    Path(path).write_text(_triple_lines(rows, cols, y[rows, cols]))


def read_categories(path: str | Path) -> np.ndarray:
    """A challenge truth file (one 1-based sample per line) as sorted 0-based int64."""
    lines = Path(path).read_text().split("\n")
    found: dict[int, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise MpinnError(f"{path}:{number}: expected a sample number >= 1, got {text!r}")
        if int(text) in found:
            raise MpinnError(f"{path}:{number}: sample {text} already listed on line {found[int(text)]}")
        found[int(text)] = number
    return np.array(sorted(found), dtype=np.int64) - 1


def write_categories(path: str | Path, cats: np.ndarray) -> None:
    """Write 0-based categories as the challenge's truth file: sorted, 1-based, one a line."""
    values = np.asarray(cats)
    if values.ndim != 1 or (values.size and (not np.issubdtype(values.dtype, np.integer)
                                             or values.min() < 0)):
        raise MpinnError("write_categories: expected a 1-D array of sample indices >= 0")
    Path(path).write_text("".join(f"{c + 1}\n" for c in np.unique(values).tolist()))
