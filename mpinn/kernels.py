"""Pure numpy math of one rank's rows: activations, their derivatives, losses, init.

Activations are stored neuron-major, shape (neurons, batch): a rank's rows of a layer
times the gathered inputs is one GEMM, and the exchange buffers are row gathers.
Nothing here talks to MPI, so every function is testable in a plain process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from mpinn.errors import MpinnError

# scipy (its BLAS wrappers, erf and expit, the CSR kernels) is imported where it is first
# used: importing it costs 0.2 s of CPU in every process, and most of the processes that
# import this module never compute (init, inspect, partition, a refused command line)


@functools.cache
def _blas(name: str, char: str) -> Callable:
    """scipy's BLAS routine ``name`` ("gemm", "axpy") for the numpy dtype char ``char``."""
    from scipy.linalg.blas import get_blas_funcs

    return get_blas_funcs(name, dtype=np.dtype(char))


def _blas_for(name: str, dtype: np.dtype) -> Callable | None:
    """``_blas`` for float32 and float64 arrays; None (use numpy) for any other dtype."""
    return _blas(name, dtype.char) if dtype.char in "fd" else None


@functools.cache
def _sparsetools() -> tuple[Callable, Callable] | None:
    """scipy's compiled (csr_matvecs, csc_matvecs), which accumulate into a given output
    without a per-call allocation; None for a scipy that moved them (the public path)."""
    try:
        from scipy.sparse._sparsetools import csc_matvecs, csr_matvecs
    except ImportError:  # pragma: no cover
        return None
    return csr_matvecs, csc_matvecs

ACTIVATIONS = ("identity", "relu", "relu_cap", "sigmoid", "tanh", "gelu", "silu", "leaky_relu",
               "softmax")
NEGATIVE_SLOPE = 0.01  # leaky_relu's default, torch's
RELU_LIKE = ("relu", "relu_cap", "leaky_relu", "gelu", "silu")  # He-initialised


def check_activation(name: str, last: bool, where: str) -> None:
    """Refuse an unknown activation, or a softmax anywhere but the last layer."""
    if name not in ACTIVATIONS:
        raise MpinnError(f"{where}: unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
    if name == "softmax" and not last:
        raise MpinnError(f"{where}: softmax is only allowed on the last layer")


def check_cap(cap: object, where: str) -> float:
    """The ``cap`` of a relu_cap layer: a finite positive number."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float, np.number)) \
            or not np.isfinite(cap) or cap <= 0:
        raise MpinnError(f"{where}: relu_cap needs a finite positive 'cap', got {cap!r}")
    return float(cap)


def check_slope(slope: object, where: str) -> float:
    """The ``negative_slope`` of a leaky_relu layer: a finite number."""
    if isinstance(slope, bool) or not isinstance(slope, (int, float, np.number)) \
            or not np.isfinite(slope):
        raise MpinnError(f"{where}: leaky_relu needs a finite 'negative_slope', got {slope!r}")
    return float(slope)


def check_dropout(p: object, last: bool, where: str) -> float:
    """A layer's stored ``dropout`` rate: a number in [0, 1), and 0 on the output layer
    (mpinn drops hidden activations only)."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not 0 <= p < 1:
        raise MpinnError(f"{where}: dropout must be a number in [0, 1), got {p!r}")
    if p and last:
        raise MpinnError(f"{where}: dropout {p:g} on the output layer; mpinn drops the "
                         "activations of hidden layers only")
    return float(p)


def activate(name: str, z: np.ndarray, out: np.ndarray | None = None,
             cap: float | None = None, slope: float | None = None) -> np.ndarray:
    """Elementwise activation of pre-activations ``z`` (softmax is handled by the engine).

    ``relu_cap`` is min(max(z, 0), cap), the Sparse DNN Graph Challenge's activation.
    ``gelu`` is torch's exact form z Phi(z) = z (1 + erf(z / sqrt 2)) / 2; ``silu`` is
    z sigmoid(z); ``leaky_relu`` is z for z > 0, else ``slope`` z (default 0.01).
    """
    if out is None:
        out = np.empty_like(z)
    if name == "identity":
        np.copyto(out, z)
    elif name == "relu":
        np.maximum(z, 0, out=out)
    elif name == "relu_cap":
        np.clip(z, 0, cap, out=out)
    elif name == "sigmoid":
        # 1/(1+exp(-z)) written to avoid overflow warnings for very negative z
        np.negative(z, out=out)
        np.clip(out, -80.0, 80.0, out=out)
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)
    elif name == "tanh":
        np.tanh(z, out=out)
    elif name in ("gelu", "silu"):
        # the factor of z goes through a scratch array when the result overwrites z
        # (inference engines activate in place)
        factor = np.empty_like(z) if np.shares_memory(out, z) else out
        from scipy.special import erf, expit

        if name == "gelu":
            np.multiply(z, _SQRT_HALF, out=factor)
            erf(factor, out=factor)
            factor += 1
            factor *= 0.5
        else:
            expit(z, out=factor)
        np.multiply(z, factor, out=out)
    elif name == "leaky_relu":
        if not np.shares_memory(out, z):
            np.copyto(out, z)
        np.multiply(out, NEGATIVE_SLOPE if slope is None else slope, out=out, where=out < 0)
    else:
        raise MpinnError(f"activation {name!r} has no elementwise form")
    return out


_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1 / np.sqrt(2 * np.pi))


def activation_grad(name: str, z: np.ndarray, a: np.ndarray, grad_a: np.ndarray,
                    cap: float | None = None, slope: float | None = None) -> np.ndarray:
    """dL/dz from dL/da for an elementwise activation; overwrites and returns ``grad_a``.

    gelu: Phi(z) + z phi(z); silu: s (1 + z (1 - s)) with s = sigmoid(z) (both from z,
    in temporaries the size of ``z``).
    """
    if name == "identity":
        pass
    elif name == "relu":
        grad_a *= z > 0
    elif name == "relu_cap":
        grad_a *= (z > 0) & (z < cap)
    elif name == "sigmoid":
        grad_a *= a * (1 - a)
    elif name == "tanh":
        grad_a *= 1 - a * a
    elif name == "gelu":
        from scipy.special import erf

        cdf = erf(z * _SQRT_HALF)
        cdf += 1
        cdf *= 0.5
        pdf = np.exp(-0.5 * z * z)
        pdf *= z
        pdf *= _INV_SQRT_2PI
        cdf += pdf
        grad_a *= cdf
    elif name == "silu":
        from scipy.special import expit

        s = expit(z)
        d = 1 - s
        d *= z
        d += 1
        d *= s
        grad_a *= d
    elif name == "leaky_relu":
        grad_a *= np.where(z > 0, 1, NEGATIVE_SLOPE if slope is None else slope).astype(z.dtype)
    else:
        raise MpinnError(f"activation {name!r} has no elementwise derivative")
    return grad_a


def dense_forward(weight: np.ndarray, bias: np.ndarray, inputs: np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Pre-activations of a rank's rows: ``weight @ inputs + bias`` (inputs neuron-major)."""
    z = np.matmul(weight, inputs, out=out)
    z += bias[:, None]
    return z


def block_forward(weight: np.ndarray, inputs: np.ndarray, columns: slice, out: np.ndarray,
                  scratch: np.ndarray | None = None) -> None:
    """``out (+)= weight[:, columns] @ inputs[columns]``: one block of a rank's pre-activations.

    The engine computes the local-input block while the remote inputs are in flight, then
    adds the remote block through ``scratch`` (preallocated, shaped like ``out``). Without
    ``scratch`` the block is written, and an empty block writes zeros.
    """
    w, x = weight[:, columns], inputs[columns]
    if w.shape[1] == 0:
        if scratch is None:
            out.fill(0)
    elif scratch is not None:
        np.matmul(w, x, out=scratch)
        out += scratch
    else:
        np.matmul(w, x, out=out)


def block_input_grad(weight: np.ndarray, grad_z: np.ndarray, columns: slice,
                     grad_inputs: np.ndarray) -> None:
    """``grad_inputs[columns] = weight[:, columns]^T @ grad_z``: partial sums of one block."""
    if weight[:, columns].shape[1]:
        np.matmul(weight[:, columns].T, grad_z, out=grad_inputs[columns])


def dense_weight_grad(grad_z: np.ndarray, inputs: np.ndarray, grad_weight: np.ndarray) -> None:
    """``grad_weight = grad_z @ inputs.T`` over the whole batch, into the preallocated array.

    The pipeline computes it once after its last tick rather than adding one product per
    micro-batch: one large GEMM, and nothing accumulates in place.
    """
    np.matmul(grad_z, inputs.T, out=grad_weight)


def axpy(a: float, x: np.ndarray, y: np.ndarray) -> None:
    """y += a * x in place, in one pass over x and y (BLAS axpy) where both are contiguous
    arrays of one float type; numpy's ``y += a * x`` makes a temporary and three passes.
    The update is memory-bound: on the 784-4096x3-10 model this halves its time."""
    if y.size == 0:  # a rank without rows in a layer (BLAS refuses empty vectors)
        return
    if (x.dtype == y.dtype and y.dtype in (np.float32, np.float64) and x.shape == y.shape
            and x.flags.c_contiguous and y.flags.c_contiguous):
        flat = y.reshape(-1)
        out = _blas("axpy", y.dtype.char)(x.reshape(-1), flat, a=a)
        if out is flat or np.shares_memory(out, y):  # written in place, as f2py does here
            return
        y[...] = out.reshape(y.shape)
        return
    y += a * x


def dense_sgd_update(grad_z: np.ndarray, inputs: np.ndarray, weight: np.ndarray,
                     lr: float) -> None:
    """Plain SGD fused into the weight-gradient GEMM: ``weight -= lr * grad_z @ inputs.T``.

    One BLAS call with beta = 1 adds the product into the weights, so the gradient is never
    written out and read back by an optimizer pass (the update is memory-bound: a whole
    pass over the weights and the gradient saved per layer). Falls back to numpy where the
    arrays are not contiguous floats of one type.
    """
    if weight.size == 0:  # a rank without rows in a layer (BLAS refuses empty matrices)
        return
    gemm = _blas_for("gemm", weight.dtype)
    if (gemm is None or not (grad_z.dtype == inputs.dtype == weight.dtype)
            or not (grad_z.flags.c_contiguous and inputs.flags.c_contiguous
                    and weight.flags.c_contiguous)):
        weight -= lr * (grad_z @ inputs.T)
        return
    # in Fortran order the C-ordered arrays are their transposes: W^T -= lr * X dZ^T
    out = gemm(-lr, inputs.T, grad_z.T, beta=1.0, c=weight.T, trans_a=1, overwrite_c=1)
    if not np.shares_memory(out, weight):  # f2py copied c after all: write the result back
        weight[...] = out.T


def dense_backward(inputs: np.ndarray, grad_z: np.ndarray, grad_weight: np.ndarray,
                   grad_bias: np.ndarray) -> None:
    """Gradients of a rank's rows: ``grad_z @ inputs.T`` and the bias sums.

    The partial sums ``W^T dz`` for the inputs come from ``block_input_grad``, a block at a
    time, so the remote ones can travel while the rest is computed.
    """
    dense_weight_grad(grad_z, inputs, grad_weight)
    np.sum(grad_z, axis=1, out=grad_bias)


def csr_matmul(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n_cols: int,
               x: np.ndarray, out: np.ndarray, accumulate: bool = False) -> None:
    """``out (+)= A @ x`` for the CSR block A (rows, n_cols); x (n_cols, batch), C-contiguous.

    Row i of ``out`` gathers the rows of ``x`` its entries name: the inner loop runs over
    the batch, contiguous in memory, which is why activations are neuron-major.
    """
    if not accumulate:
        out.fill(0)
    if values.size == 0:
        return
    kernels = _sparsetools()
    if kernels is None:  # pragma: no cover
        import scipy.sparse as sp

        out += sp.csr_matrix((values, indices, indptr), shape=(out.shape[0], n_cols)) @ x
        return
    kernels[0](out.shape[0], n_cols, x.shape[1], indptr, indices, values,
                x.reshape(-1), out.reshape(-1))


def csr_transpose_matmul(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                         n_cols: int, grad_z: np.ndarray, out: np.ndarray,
                         accumulate: bool = False) -> None:
    """``out (+)= A^T @ grad_z`` (n_cols, batch): the partial sums a CSR block sends back.

    A's CSR arrays are A^T's CSC arrays, so scipy's CSC kernel does it without a transpose.
    """
    if not accumulate:
        out.fill(0)
    if values.size == 0:
        return
    kernels = _sparsetools()
    if kernels is None:  # pragma: no cover
        import scipy.sparse as sp

        out += sp.csr_matrix((values, indices, indptr), shape=(grad_z.shape[0], n_cols)).T @ grad_z
        return
    kernels[1](n_cols, grad_z.shape[0], grad_z.shape[1], indptr, indices, values,
                grad_z.reshape(-1), out.reshape(-1))


def csr_weight_grad(indptr: np.ndarray, indices: np.ndarray, entry_rows: np.ndarray,
                    grad_z: np.ndarray, x: np.ndarray, out: np.ndarray,
                    chunk_elements: int = 1 << 21) -> None:
    """``out[k] = grad_z[row_k] . x[col_k]`` for every entry k of a CSR block (a sampled
    product): only stored connections get a gradient, so the pattern is kept.

    Above a fill of 1/64 a GEMM of a few rows against all of ``x``, sampled afterwards,
    beats gathering two rows per entry; below it, entries go in chunks. Either way the
    temporaries stay under ``chunk_elements`` values, never the dense matrix.
    """
    out.fill(0)  # both paths below add into it chunk by chunk
    n_rows, batch = grad_z.shape[0], max(1, grad_z.shape[1])
    if out.size == 0:
        return
    if out.size * 64 >= n_rows * x.shape[0]:
        step = max(1, chunk_elements // max(1, x.shape[0]))
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            lo, hi = int(indptr[r0]), int(indptr[r1])
            if hi > lo:
                full = grad_z[r0:r1] @ x.T
                out[lo:hi] += full[entry_rows[lo:hi] - r0, indices[lo:hi]]
        return
    step = max(1, chunk_elements // batch)
    for start in range(0, out.size, step):
        stop = min(start + step, out.size)
        out[start:stop] += np.einsum("kb,kb->k", grad_z[entry_rows[start:stop]],
                                     x[indices[start:stop]])


def pattern_counts(rng: np.random.Generator, n_rows: int, n_in: int, fan_in: int | None,
                   density: float | None) -> np.ndarray:
    """Connections of each of ``n_rows`` new sparse neurons: ``fan_in`` each, or a
    binomial(n_in, density) count (the number of successes of a Bernoulli row).

    The first draw of a block's wiring stream, so the counts alone are cheap to redo.
    """
    if fan_in is not None:
        return np.full(n_rows, fan_in, dtype=np.int64)
    return rng.binomial(n_in, density, size=n_rows).astype(np.int64)


def random_pattern(rng: np.random.Generator, n_rows: int, n_in: int, fan_in: int | None,
                   density: float | None) -> tuple[np.ndarray, np.ndarray]:
    """CSR pattern (row counts, sorted column indices) of ``n_rows`` new sparse neurons.

    ``fan_in`` K: K distinct random inputs per neuron. ``density`` D: each connection
    exists with probability D, drawn as a binomial count per row and then that many
    distinct positions (the same law as a Bernoulli per pair). O(connections) work.
    """
    counts = pattern_counts(rng, n_rows, n_in, fan_in, density)
    return counts, distinct_columns(rng, counts, n_in)


def distinct_columns(rng: np.random.Generator, counts: np.ndarray, n_in: int,
                     chunk_elements: int = 1 << 22) -> np.ndarray:
    """``counts[i]`` distinct columns in 0..n_in-1 for each row i, each row's sorted, rows
    concatenated; every subset of a row's size equally likely.

    A row that takes at most a quarter of its inputs (or leaves out at most a quarter,
    drawn as the complement) is sampled with replacement and its repeats redrawn until
    none is left: about one draw per connection. A row in between ranks random keys over
    all its inputs, at most four per connection. No Python loop runs over rows.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.max() > n_in):
        raise MpinnError(f"cannot draw {counts.max()} distinct inputs out of {n_in}")
    full = 2 * counts > n_in
    drawn = np.where(full, n_in - counts, counts)
    middle = 4 * drawn > n_in
    rows = np.arange(counts.size, dtype=np.int64)
    parts = [_rejection_keys(rng, rows[~middle], drawn[~middle], n_in)]
    middle_rows = rows[middle]
    step = max(1, chunk_elements // n_in)
    for start in range(0, middle_rows.size, step):
        chunk = middle_rows[start:start + step]
        order = np.argsort(rng.random((chunk.size, n_in)), axis=1)
        taken = order[np.arange(n_in) < drawn[chunk, None]]
        parts.append(np.repeat(chunk, drawn[chunk]) * n_in + taken)
    keys = np.sort(np.concatenate(parts))
    full_rows = np.flatnonzero(full)
    if full_rows.size:  # what was drawn for these rows is the inputs they leave out
        left_out = full[keys // n_in]
        mask = np.ones((full_rows.size, n_in), dtype=bool)
        mask[np.searchsorted(full_rows, keys[left_out] // n_in), keys[left_out] % n_in] = False
        slot, column = np.nonzero(mask)
        keys = np.sort(np.concatenate([keys[~left_out], full_rows[slot] * n_in + column]))
    return keys % n_in


def _rejection_keys(rng: np.random.Generator, rows: np.ndarray, drawn: np.ndarray,
                    n_in: int) -> np.ndarray:
    """Sorted keys ``row * n_in + column``, ``drawn[i]`` distinct columns for ``rows[i]``.

    Drawn with replacement, then each repeat redrawn; every round treats all columns
    alike, so the set it ends with is uniform among the sets of its size. With at most a
    quarter of a row taken, each round leaves under a quarter of its redraws repeated.
    """
    row_of = np.repeat(rows, drawn)
    keys = np.sort(row_of * n_in + rng.integers(0, n_in, size=row_of.size))
    while True:
        repeat = np.flatnonzero(keys[1:] == keys[:-1]) + 1
        if repeat.size == 0:
            return keys
        again = keys[repeat] // n_in * n_in + rng.integers(0, n_in, size=repeat.size)
        # the kept keys are still sorted: a stable sort (timsort) merges the two runs
        keys = np.sort(np.concatenate([np.delete(keys, repeat), np.sort(again)]), kind="stable")


def init_rows(rng: np.random.Generator, n_rows: int, n_in: int, n_out: int, activation: str,
              dtype: np.dtype, n_values: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Initial weights and biases of ``n_rows`` neurons: He-uniform for ReLU, else Glorot.

    ``n_in`` is the fan-in (for sparse rows, the mean inputs per row); ``n_values`` the
    number of weights to draw when they are not a dense (n_rows, n_in) block.
    """
    fan_in = max(n_in, 1)
    if activation in RELU_LIKE:
        bound = np.sqrt(6.0 / fan_in)
    else:
        bound = np.sqrt(6.0 / (fan_in + n_out))
    shape = (n_rows, n_in) if n_values is None else (n_values,)
    weight = rng.uniform(-bound, bound, size=shape).astype(dtype)
    bias = np.zeros(n_rows, dtype=dtype)
    return weight, bias


def dropout_mask(seed: int, step: int, gids: np.ndarray, samples: np.ndarray, p: float,
                 out: np.ndarray) -> np.ndarray:
    """Inverted-dropout mask (rows, batch): 1 / (1 - p) where neuron ``gids[r]`` is kept on
    sample ``samples[b]`` at optimizer step ``step``, else 0.

    A counter-based draw: splitmix64 of (seed, step, gid, sample) gives a uniform u in
    [0, 1), kept when u >= p. Nothing depends on which rank holds the neuron or which
    other samples share the batch, so any partition and rank count draw the same masks.
    """
    mix = (seed * 0x9E3779B97F4A7C15 + step * 0xD1B54A32D192ED03) & _MASK64
    key = np.asarray(gids, np.uint64)[:, None] * np.uint64(0xBF58476D1CE4E5B9) \
        + np.asarray(samples, np.uint64)[None, :] * np.uint64(0x94D049BB133111EB) + np.uint64(mix)
    key ^= key >> np.uint64(31)
    key *= np.uint64(0x7FB5D329728EA185)
    key ^= key >> np.uint64(27)
    key *= np.uint64(0x81DADEF4BC2DD44D)
    key ^= key >> np.uint64(33)
    uniform = (key >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    np.multiply(uniform >= p, 1.0 / (1.0 - p), out=out, casting="unsafe")
    return out


_MASK64 = (1 << 64) - 1


def softmax_shifted_exp(z: np.ndarray, global_max: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``exp(z - max)`` of a rank's output rows, with the max taken over all ranks' rows."""
    np.subtract(z, global_max[None, :], out=out)
    np.exp(out, out=out)
    return out


def label_hits(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Boolean (rows, batch): True where a rank's output neuron is the sample's class."""
    return rows[:, None] == labels[None, :]


def cross_entropy_local(z: np.ndarray, global_max: np.ndarray, log_sum: np.ndarray,
                        hits: np.ndarray) -> float:
    """This rank's share of the summed cross-entropy: -log p of the labels it owns."""
    log_p = z - global_max[None, :] - log_sum[None, :]
    return float(-log_p[hits].sum(dtype=np.float64))


def soft_cross_entropy_local(z: np.ndarray, global_max: np.ndarray, log_sum: np.ndarray,
                             targets: np.ndarray) -> float:
    """This rank's share of the summed soft-label cross-entropy, -sum_i t_i log p_i over the
    output rows it owns, for targets ``t`` that are probability distributions over the
    outputs (torch's ``cross_entropy`` with probabilities). Its gradient in z is p - t, the
    form of hard labels, since every t sums to 1."""
    log_p = z - global_max[None, :] - log_sum[None, :]
    return float(-np.einsum("ij,ij->", targets, log_p, dtype=np.float64))


def squared_error_local(a: np.ndarray, target: np.ndarray) -> float:
    """This rank's share of the summed squared error, halved: sum((a - t)^2) / 2."""
    d = a - target
    return float(0.5 * np.einsum("ij,ij->", d, d, dtype=np.float64))
