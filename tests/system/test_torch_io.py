"""PyTorch import and export (mpinn.io.pytorch): converted models compute the same outputs."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from mpinn.errors import MpinnError
from mpinn.io.create import LayerArrays, write_model
from mpinn.io.pytorch import from_torch, load_torch_file, save_torch_file, to_torch
from mpinn.optim import make_optimizer
from tests.reference import Reference

try:
    import torch
except ImportError as exc:  # `make setup` installs it: without torch these tests fail, never skip
    raise ImportError("PyTorch is not installed: `make setup` installs torch==2.13.0 (CPU build), "
                      "which tests/system/test_torch_io.py needs") from exc
nn = torch.nn

TOLERANCE = {"float32": 1e-6, "float64": 1e-12}


def every_activation(dtype: str) -> torch.nn.Sequential:
    """A Sequential using each supported activation once, weights large enough to hit the cap."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 9), nn.ReLU(),
        nn.Linear(9, 8), nn.Tanh(),
        nn.Linear(8, 8), nn.Sigmoid(),
        nn.Linear(8, 7), nn.Hardtanh(0, 4),
        nn.Linear(7, 5), nn.Softmax(dim=-1),
    ).to(getattr(torch, dtype))
    with torch.no_grad():
        model[6].weight.mul_(8.0)
        model[6].bias.add_(2.5)
    return model.eval()


def numpy_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """The model file's outputs, computed from its datasets with numpy alone."""
    with h5py.File(path, "r") as f:
        a = x.astype(np.float64)
        for index in range(1, len(f.attrs["sizes"])):
            group = f["layers"][str(index)]
            n_out, n_in = int(f.attrs["sizes"][index]), int(f.attrs["sizes"][index - 1])
            if group.attrs["storage"] == "csr":
                weight = sp.csr_matrix((group["data"][...], group["indices"][...], group["indptr"][...]),
                                       shape=(n_out, n_in)).toarray()
            else:
                weight = group["weight"][...]
            z = a @ weight.T.astype(np.float64) + group["bias"][...].astype(np.float64)
            activation = group.attrs["activation"]
            if activation == "relu":
                a = np.maximum(z, 0)
            elif activation == "relu_cap":
                a = np.minimum(np.maximum(z, 0), float(group.attrs["cap"]))
            elif activation == "sigmoid":
                a = 1 / (1 + np.exp(-z))
            elif activation == "tanh":
                a = np.tanh(z)
            elif activation == "softmax":
                e = np.exp(z - z.max(axis=1, keepdims=True))
                a = e / e.sum(axis=1, keepdims=True)
            else:
                a = z
    return a


def torch_outputs(model: torch.nn.Module, x: np.ndarray, dtype: str) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x.astype(dtype))).double().numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_to_mpinn_to_torch_keeps_outputs(tmp_path: Path, dtype: str) -> None:
    model = every_activation(dtype)
    path = tmp_path / "model.h5"
    from_torch(model, str(path))
    back = to_torch(str(path))
    x = np.random.default_rng(1).normal(size=(64, 6)) * 3
    assert np.abs(torch_outputs(back, x, dtype) - torch_outputs(model, x, dtype)).max() <= TOLERANCE[dtype]
    assert back[0].weight.dtype == getattr(torch, dtype)
    assert [type(m) for m in back] == [type(m) for m in model]
    capped = torch_outputs(nn.Sequential(*back[:8]), x, dtype)
    assert capped.max() == 4.0 and 0 < (capped == 4.0).mean() < 0.9  # the relu_cap layer really caps


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mpinn_file_from_torch_computes_torch_outputs(tmp_path: Path, dtype: str) -> None:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU6()),  # nested, no bias
        nn.Dropout(0.3),
        nn.Linear(7, 6), nn.Identity(),
        nn.Linear(6, 6), nn.Hardtanh(0.0, 0.5),
        nn.Linear(6, 4), nn.Sigmoid(),
        nn.Linear(4, 3),  # no activation: identity
    ).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        model[1][0].weight.mul_(6.0)
    path = tmp_path / "model.h5"
    from_torch(model, str(path))
    with h5py.File(path, "r") as f:
        assert f.attrs["sizes"].tolist() == [5, 7, 6, 6, 4, 3]
        assert [f["layers"][str(i)].attrs["activation"] for i in range(1, 6)] == \
            ["relu_cap", "identity", "relu_cap", "sigmoid", "identity"]
        assert f["layers/1"].attrs["cap"] == 6.0 and f["layers/3"].attrs["cap"] == 0.5
        assert not f["layers/1/bias"][...].any()
        assert f["layers/1/weight"].dtype == np.dtype(dtype)
    x = np.random.default_rng(3).normal(size=(50, 5))
    expected = torch_outputs(model, x, dtype)
    # numpy computes in float64 from the stored weights; torch in the model's dtype
    assert np.abs(numpy_forward(path, x.astype(dtype)) - expected).max() <= \
        (1e-5 if dtype == "float32" else 1e-12)


def test_dtype_argument_overrides_the_weights_dtype(tmp_path: Path) -> None:
    model = every_activation("float32")
    path = tmp_path / "model.h5"
    from_torch(model, str(path), dtype="float64")
    with h5py.File(path, "r") as f:
        assert f["layers/1/weight"].dtype == np.float64
    assert to_torch(str(path))[0].weight.dtype == torch.float64
    with pytest.raises(MpinnError, match="float16"):
        from_torch(every_activation("float32").half(), str(path))


def test_csr_layers_export_as_dense_weights_zero_off_pattern(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    sizes = [10, 12, 8, 4]
    sparse = [sp.random(sizes[i + 1], sizes[i], density=0.3, format="csr", random_state=rng,
                        data_rvs=lambda n: rng.normal(size=n) + 3.0) for i in (0, 2)]
    layers = [LayerArrays("relu_cap", sparse[0], rng.normal(size=12), cap=2.0),
              LayerArrays("tanh", rng.normal(size=(8, 12)), rng.normal(size=8)),
              LayerArrays("softmax", sparse[1], rng.normal(size=4))]
    path = tmp_path / "sparse.h5"
    write_model(str(path), sizes, layers, "float64")
    model = to_torch(str(path))
    for linear, matrix in ((model[0], sparse[0]), (model[4], sparse[1])):
        weight = linear.weight.detach().numpy()
        pattern = matrix.toarray() != 0
        assert np.array_equal(weight[pattern], matrix.toarray()[pattern])
        assert not weight[~pattern].any()
    x = rng.normal(size=(40, 10))
    assert np.abs(torch_outputs(model, x, "float64") - numpy_forward(path, x)).max() <= 1e-12


@pytest.mark.parametrize(("model", "problem"), [
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1)), r"module 1 \(Conv1d\) is not supported"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), r"module 1 \(BatchNorm1d\)"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh()), r"module 2 \(Tanh\): two activations"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 2)),
     r"module 2 \(Linear\) follows the softmax of module 1: softmax must be the last"),
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(4, 2)),
     r"module 2 \(Linear\) takes 4 input features but module 0 \(Linear\) gives 5"),
    (lambda: nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), r"module 0 \(ReLU\) comes before any nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Hardtanh(-1, 1)), r"module 1 \(Hardtanh\).*no mpinn"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=0)), r"module 1 \(Softmax\): softmax over dim=0"),
    (lambda: nn.Sequential(nn.Dropout(0)), "no nn.Linear"),
    # a Dropout mpinn cannot store as a hidden layer's rate
    (lambda: nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 2)),
     r"module 0 \(Dropout\) comes before any nn.Linear: mpinn has no dropout on the inputs"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.ReLU(), nn.Linear(4, 2)),
     r"module 2 \(ReLU\) follows module 1 \(Dropout\), which follows a Linear"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Softmax(-1),
                           nn.Dropout(0.2)),
     r"module 4 \(Dropout\) follows the output layer module 2 \(Linear\); mpinn drops the "
     "activations of hidden layers only"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 2), nn.Dropout(0.1)),
     r"module 3 \(Dropout\) follows the output layer"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.2), nn.Dropout(0.3),
                           nn.Linear(4, 2)),
     r"module 3 \(Dropout\) follows module 2, another Dropout"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(1.0), nn.Linear(4, 2)),
     r"module 2 \(Dropout\): dropout probability 1 is not in \(0, 1\)"),
    (lambda: nn.Linear(4, 4), "expected a plain torch.nn.Sequential"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.LazyLinear(2)), r"module 1 \(LazyLinear\) is a lazy module"),
])
def test_unconvertible_models_are_refused_naming_the_module(
        tmp_path: Path, model: Callable[[], torch.nn.Module], problem: str) -> None:
    path = tmp_path / "model.h5"
    with pytest.raises(MpinnError, match=problem):
        from_torch(model(), str(path))
    with pytest.raises(MpinnError, match=problem):
        save_torch_file(model(), str(tmp_path / "model.pt"))
    assert not os.listdir(tmp_path)  # nothing half-written


def test_dropout_after_a_hidden_layer_is_its_stored_rate_and_exports_back(tmp_path: Path) -> None:
    """import: an nn.Dropout(p) after a hidden layer's activation (or after its Linear when
    it has none) is the layer's ``dropout`` attribute; export writes it back where it was."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 9), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(9, 8), nn.Dropout(0.125),  # an identity layer's
                          nn.Linear(8, 7), nn.Tanh(), nn.Dropout(0),  # the identity: skipped
                          nn.Linear(7, 5), nn.Softmax(dim=-1)).double().eval()
    path = tmp_path / "model.h5"
    from_torch(model, str(path))
    with h5py.File(path, "r") as f:
        rates = [f[f"layers/{i}"].attrs.get("dropout", 0.0) for i in range(1, 5)]
    assert rates == [0.3, 0.125, 0.0, 0.0]
    back = to_torch(str(path))
    assert [(type(m).__name__, getattr(m, "p", None)) for m in back] == [
        ("Linear", None), ("ReLU", None), ("Dropout", 0.3), ("Linear", None), ("Dropout", 0.125),
        ("Linear", None), ("Tanh", None), ("Linear", None), ("Softmax", None)]
    assert not back.training  # eval: the outputs are the model's, without dropout
    x = np.random.default_rng(1).normal(size=(32, 6))
    assert np.abs(torch_outputs(back, x, "float64") - torch_outputs(model, x, "float64")).max() <= 1e-12
    again = tmp_path / "again.h5"
    from_torch(back, str(again))  # the round trip keeps the rates
    with h5py.File(again, "r") as f:
        assert [f[f"layers/{i}"].attrs.get("dropout", 0.0) for i in range(1, 5)] == rates
    saved = tmp_path / "model.pt"
    save_torch_file(back, str(saved))
    assert [getattr(m, "p", None) for m in load_torch_file(str(saved))
            if isinstance(m, nn.Dropout)] == [0.3, 0.125]


def test_modules_with_custom_forward_or_hooks_are_refused(tmp_path: Path) -> None:
    class Doubled(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    with pytest.raises(MpinnError, match=r"module 1 \(Doubled\) is not supported"):
        from_torch(nn.Sequential(nn.Linear(3, 3), Doubled()), str(tmp_path / "m.h5"))
    hooked = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    hooked[1].register_forward_hook(lambda _m, _i, out: out * 2)
    with pytest.raises(MpinnError, match=r"module 1 \(ReLU\) has forward hooks"):
        from_torch(hooked, str(tmp_path / "m.h5"))


def test_saved_torch_file_loads_back_with_the_same_outputs(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 6, bias=False), nn.ReLU6()), nn.Dropout(0.25),
                          nn.Linear(6, 4), nn.Hardtanh(0, 2.5), nn.Linear(4, 3), nn.Softmax(dim=1)).eval()
    path = tmp_path / "model.pt"
    save_torch_file(model, str(path))
    loaded = load_torch_file(str(path))
    assert not loaded.training
    assert [type(m) for m in loaded] == [nn.Linear, nn.Hardtanh, nn.Dropout, nn.Linear, nn.Hardtanh,
                                         nn.Linear, nn.Softmax]
    assert loaded[0].bias is None and loaded[2].p == 0.25 and loaded[4].max_val == 2.5
    x = np.random.default_rng(6).normal(size=(30, 5))
    assert np.array_equal(torch_outputs(loaded, x, "float32"), torch_outputs(model, x, "float32"))
    # the CLI's path: torch file -> mpinn -> torch file
    from_torch(loaded, str(tmp_path / "model.h5"))
    save_torch_file(to_torch(str(tmp_path / "model.h5")), str(tmp_path / "back.pt"))
    again = load_torch_file(str(tmp_path / "back.pt"))
    assert np.abs(torch_outputs(again, x, "float32") - torch_outputs(model, x, "float32")).max() <= 1e-6


def test_hand_written_torch_file_in_the_documented_format_loads(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    path = tmp_path / "model.pt"
    torch.save({"mpinn_sequential": [["linear", 3, 4, True], ["tanh"], ["linear", 4, 2, True]],
                "state_dict": model.state_dict()}, path)
    x = np.random.default_rng(7).normal(size=(8, 3))
    assert np.array_equal(torch_outputs(load_torch_file(str(path)), x, "float32"),
                          torch_outputs(model, x, "float32"))


class _Payload:
    """Pickles as a call to os.system: what weights_only loading must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_torch_files_with_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"mpinn_sequential": [], "state_dict": {}, "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(MpinnError, match="weights_only"):
        load_torch_file(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "module.pt")  # a whole pickled nn.Module
    with pytest.raises(MpinnError, match=r"weights_only=True\) \(Unsupported global: .*Sequential"):
        load_torch_file(str(tmp_path / "module.pt"))


def test_torch_files_without_a_valid_description_are_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    cases = {
        "bare state_dict": (model.state_dict(), "bare state_dict"),
        "unknown kind": ({"mpinn_sequential": [["conv", 1]], "state_dict": {}}, "unknown module kind"),
        "wrong shape": ({"mpinn_sequential": [["linear", 3, 5, True]], "state_dict": model.state_dict()},
                        r"state_dict\['0.weight'\] must be a float tensor of shape \(5, 3\)"),
        "unused tensor": ({"mpinn_sequential": [["linear", 3, 4, False]], "state_dict": model.state_dict()},
                          "no module uses: 0.bias"),
        "not a torch file": (None, "refused by torch.load"),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / f"{name}.pt"
        if content is None:
            path.write_text("not a zip archive")
        else:
            torch.save(content, path)
        with pytest.raises(MpinnError, match=problem):
            load_torch_file(str(path))
    with pytest.raises(MpinnError, match="no such file"):
        load_torch_file(str(tmp_path / "missing.pt"))


def test_to_torch_refuses_files_that_are_not_mpinn_models(tmp_path: Path) -> None:
    with pytest.raises(MpinnError, match="no such file"):
        to_torch(str(tmp_path / "missing.h5"))
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(MpinnError, match="not an HDF5 file"):
        to_torch(str(tmp_path / "text.h5"))
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(MpinnError, match="not an mpinn model"):
        to_torch(str(tmp_path / "other.h5"))


def test_missing_pytorch_is_reported_with_the_install_command(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(MpinnError, match=r"needs PyTorch: pip install 'mpinn\[torch\]'"):
        to_torch(str(tmp_path / "model.h5"))


def test_cli_imports_a_torch_model_that_mpinn_then_predicts_and_exports_back(tmp_path: Path) -> None:
    from tests.system.test_cli import mpinn, ok

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Dropout(0.25), nn.Linear(20, 16),
                          nn.ReLU6(), nn.Linear(16, 5), nn.Softmax(dim=-1)).eval()
    pt, h5, data, preds, back = (tmp_path / name for name in
                                 ("in.pt", "m.h5", "d.h5", "p.h5", "out.pt"))
    save_torch_file(model, str(pt))
    ok(mpinn(1, "import-torch", str(pt), str(h5)))
    layer_lines = [line.split() for line in ok(mpinn(1, "inspect", str(h5))).splitlines()
                   if line.split()[:1] in (["1"], ["2"], ["3"])]
    assert [words[-1] for words in layer_lines[:3]] == ["0.25", "0", "0"]  # the dropout column
    ok(mpinn(1, "data", "classification", str(data), "--samples", "30", "--features", "12",
             "--outputs", "5"))
    ok(mpinn(3, "predict", str(h5), "--data", str(data), "--out", str(preds)))
    with h5py.File(data, "r") as f:
        x = torch.from_numpy(f["X"][...])
    with h5py.File(preds, "r") as f, torch.no_grad():
        np.testing.assert_allclose(f["outputs"][...], model(x).numpy(), rtol=1e-5, atol=1e-6)
    ok(mpinn(2, "export-torch", str(h5), str(back)))
    exported = load_torch_file(str(back))
    assert [m.p for m in exported if isinstance(m, nn.Dropout)] == [0.25]
    with torch.no_grad():
        np.testing.assert_allclose(exported(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the optimizers, against torch.optim

OPTIMIZERS = [("sgd", 0.0, 0.1), ("sgd", 0.9, 0.05), ("adam", 0.0, 0.01)]


def torch_optimizer(name: str, momentum: float, lr: float, params: list) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("name", "momentum", "lr"), OPTIMIZERS)
def test_optimizers_and_the_reference_step_like_torch_optim(dtype: str, name: str, momentum: float,
                                                            lr: float) -> None:
    """mpinn.optim and tests/reference.py's update both follow torch.optim, step by step."""
    rng = np.random.default_rng(8)
    shapes = [(7, 5), (7,), (3, 7)]
    start = [rng.normal(size=shape).astype(dtype) for shape in shapes]
    ours = [p.copy() for p in start]
    grads = [np.zeros_like(p) for p in start]
    optimizer = make_optimizer(name, list(zip(ours, grads, strict=True)), lr, momentum)
    ref = Reference([start[0].copy(), start[2].copy()], [start[1].copy(), np.zeros(3, dtype)],
                    ["relu", "identity"])
    theirs = [torch.tensor(p, requires_grad=True) for p in start]
    peer = torch_optimizer(name, momentum, lr, theirs)
    for _ in range(6):
        step = [rng.normal(size=shape).astype(dtype) for shape in shapes]
        for grad, g in zip(grads, step, strict=True):
            grad[...] = g  # the optimizer may use its gradient buffers as scratch
        optimizer.step()
        ref.step([step[0], step[2]], [step[1], np.zeros(3, dtype)], name, lr, momentum)
        for tensor, g in zip(theirs, step, strict=True):
            tensor.grad = torch.from_numpy(g.copy())
        peer.step()
    tolerance = 1e-6 if dtype == "float32" else 1e-13
    expected = [t.detach().numpy() for t in theirs]
    for what, got in (("mpinn.optim", ours), ("reference", [ref.weights[0], ref.biases[0], ref.weights[1]])):
        for param, want in zip(got, expected, strict=True):
            assert param.dtype == np.dtype(dtype)
            err = np.abs(param - want).max() / np.abs(want).max()
            assert err <= tolerance, f"{what}: relative error {err:.3g} from torch.optim"


@pytest.mark.parametrize(("name", "momentum", "lr"), OPTIMIZERS)
def test_training_at_two_ranks_equals_torch_training(tmp_path: Path, name: str, momentum: float,
                                                     lr: float) -> None:
    """A torch model trained by mpinn (2 ranks, cross-entropy on a softmax output) ends with
    the weights that torch.optim and nn.CrossEntropyLoss give it, batch by batch."""
    from tests.system.test_cli import mpinn, ok

    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 9), nn.ReLU(),
                          nn.Linear(9, 5)).double()
    h5, data = tmp_path / "m.h5", tmp_path / "d.h5"
    from_torch(nn.Sequential(*model, nn.Softmax(dim=-1)), str(h5))
    ok(mpinn(1, "data", "classification", str(data), "--samples", "70", "--features", "12",
             "--outputs", "5", "--dtype", "float64"))
    ok(mpinn(2, "train", str(h5), "--data", str(data), "--epochs", "2", "--batch-size", "32",
             "--optimizer", name, "--momentum", str(momentum), "--lr", str(lr), "--no-shuffle"))
    with h5py.File(data, "r") as f:
        x, y = torch.from_numpy(f["X"][...]), torch.from_numpy(f["y"][...]).long()
    peer = torch_optimizer(name, momentum, lr, list(model.parameters()))
    for _ in range(2):
        for start in range(0, 70, 32):  # the last batch is partial: 6 samples
            peer.zero_grad()
            nn.functional.cross_entropy(model(x[start:start + 32]), y[start:start + 32]).backward()
            peer.step()
    trained = Reference.from_file(str(h5))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for i, linear in enumerate(linears):
        for ours, theirs in ((trained.weights[i], linear.weight), (trained.biases[i], linear.bias)):
            want = theirs.detach().numpy()
            assert np.abs(ours - want).max() <= 1e-10 * np.abs(want).max(), f"layer {i + 1}"
