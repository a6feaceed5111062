"""Conversion between PyTorch ``nn.Sequential`` multilayer perceptrons and mpinn model files.

``from_torch`` writes an mpinn model file from a Sequential of ``nn.Linear`` layers, each
optionally followed by one activation module; ``to_torch`` builds such a Sequential back from
a model file. Both give the same outputs as the model they convert (torch's ``Linear.weight``
is already mpinn's (receiving neuron, sending neuron) layout, so weights are copied as is).

=========================================  =========================================
PyTorch module                             mpinn layer activation
=========================================  =========================================
``nn.Linear`` not followed by activation   ``identity`` (a Linear without bias: zero bias)
``nn.ReLU``, ``nn.Sigmoid``, ``nn.Tanh``   ``relu``, ``sigmoid``, ``tanh``
``nn.Hardtanh(0, c)``, ``nn.ReLU6``        ``relu_cap`` with ``cap`` c (6 for ReLU6)
``nn.GELU()`` (exact), ``nn.SiLU``         ``gelu``, ``silu``
``nn.LeakyReLU(s)``                        ``leaky_relu`` with ``negative_slope`` s
``nn.Softmax(dim=-1 or 1)``, last only     ``softmax``
``nn.Dropout(p)`` after a hidden layer     the layer's ``dropout`` rate p (training only)
``nn.Identity``, ``nn.Flatten``            skipped
=========================================  =========================================

A Dropout belongs to the hidden layer whose activation it follows (or whose Linear, for
a layer without activation): training drops that layer's activations, inference ignores
it, as ``model.eval()`` does. A Dropout that mpinn cannot express so is refused: before
the first Linear (input dropout), between a Linear and its activation, on the output
layer, or two in a row. ``nn.Dropout(0)`` is the identity and is skipped anywhere.

Nested Sequentials are flattened. Anything else (a convolution, a normalisation, a module
class that overrides ``forward``, a module with forward hooks) is refused, naming the module:
mpinn could not reproduce its outputs.

``to_torch`` gives every layer a dense ``nn.Linear``: a CSR layer becomes a dense weight
with zeros where the file has no connection. Torch does not keep the sparsity pattern, so
writing that model back with ``from_torch`` stores the layer dense.

**Torch model files.** A bare ``state_dict`` has no activations and pickling a whole
``nn.Module`` means running arbitrary code on load, so ``save_torch_file`` and
``load_torch_file`` use a small self-describing variant of a state_dict::

    torch.save({"mpinn_sequential": [["linear", 784, 128, True], ["relu"],
                                     ["linear", 128, 10, True], ["softmax", -1]],
                "state_dict": model.state_dict()}, "model.pt")

``mpinn_sequential`` describes the modules of a flat Sequential in order, and the
state_dict's keys are that Sequential's (``"<position>.weight"``, ``"<position>.bias"``).
The entries are ``["linear", in, out, has_bias]``, ``["relu"]``, ``["sigmoid"]``,
``["tanh"]``, ``["identity"]``, ``["softmax", dim]``, ``["hardtanh", min, max]``,
``["dropout", p]`` and ``["flatten", start_dim, end_dim]``. The file holds only lists,
strings, numbers and tensors, so it is read with ``torch.load(weights_only=True)``, whose
unpickler refuses everything else: loading never runs code from the file. From PyTorch
alone the file is ``save_torch_file(model, path)`` or the ``torch.save`` call above.

PyTorch is an optional dependency (``pip install 'mpinn[torch]'``), imported only when a
function here is called.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from mpinn.errors import MpinnError
from mpinn.io.create import LayerArrays, write_model
from mpinn.io.hdf5 import available_memory, opened
from mpinn.io.schema import DTYPES, read_layer, read_spec
from mpinn.io.staging import staged
from mpinn.kernels import check_activation

if TYPE_CHECKING:
    import torch


FILE_KEYS = ("mpinn_sequential", "state_dict")


def _torch() -> ModuleType:
    """Import PyTorch on first use, with an actionable error when it is not installed."""
    try:
        import torch
    except ImportError:
        raise MpinnError("converting to or from PyTorch needs PyTorch: pip install 'mpinn[torch]'") from None
    return torch


# ---------------------------------------------------------------- reading a Sequential


@dataclass
class _Layer:
    """One mpinn layer found in a Sequential: its Linear and the activation that follows."""

    name: str  # the Linear's module index, dotted inside nested Sequentials
    linear: torch.nn.Linear
    activation: str = "identity"
    activation_name: str | None = None  # module that set the activation
    cap: float | None = None
    negative_slope: float | None = None
    dropout: float = 0.0
    dropout_name: str | None = None  # module that set the dropout


def _where(name: str, module: torch.nn.Module) -> str:
    return f"module {name} ({type(module).__name__})"


def _plain(module: torch.nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls``'s own: its outputs are known."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _check_hooks(name: str, module: torch.nn.Module) -> None:
    """Refuse a module whose forward hooks could change what it computes."""
    if getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None):
        raise MpinnError(f"{_where(name, module)} has forward hooks, which mpinn cannot reproduce")


def _flatten(module: torch.nn.Module, prefix: str = "") -> list[tuple[str, torch.nn.Module]]:
    """The leaf modules of a Sequential, nested Sequentials expanded, with dotted names."""
    nn = _torch().nn
    leaves = []
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.modules.lazy.LazyModuleMixin):
            raise MpinnError(f"{_where(name, child)} is a lazy module: run the model once so its "
                             "sizes are known")
        _check_hooks(name, child)
        if isinstance(child, nn.Sequential):
            if not _plain(child, nn.Sequential):
                raise MpinnError(f"{_where(name, child)} overrides forward; only plain nn.Sequential "
                                 "containers can be converted")
            leaves.extend(_flatten(child, f"{name}."))
        else:
            leaves.append((name, child))
    return leaves


def _classify(name: str, module: torch.nn.Module) -> tuple[str, float | None]:
    """What a leaf module is to mpinn: ``linear``, ``skip`` or an activation (with its cap,
    or leaky_relu's negative slope)."""
    nn = _torch().nn
    where = _where(name, module)
    if _plain(module, nn.Linear):
        return "linear", None
    if _plain(module, nn.Dropout):
        return ("dropout", float(module.p)) if module.p else ("skip", None)
    if any(_plain(module, cls) for cls in (nn.Identity, nn.Flatten)):
        return "skip", None
    for cls, activation in ((nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"),
                            (nn.SiLU, "silu")):
        if _plain(module, cls):
            return activation, None
    if _plain(module, nn.GELU):
        if module.approximate != "none":
            raise MpinnError(f"{where}: GELU(approximate={module.approximate!r}) has no mpinn "
                             "activation (gelu is the exact erf form, approximate='none')")
        return "gelu", None
    if _plain(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if _plain(module, nn.Softmax):
        if module.dim not in (-1, 1):
            raise MpinnError(f"{where}: softmax over dim={module.dim}; mpinn's softmax is over the "
                             "features (dim=-1 or dim=1)")
        return "softmax", None
    if _plain(module, nn.Hardtanh):  # nn.ReLU6 is Hardtanh(0, 6)
        low, high = float(module.min_val), float(module.max_val)
        if low != 0 or not (math.isfinite(high) and high > 0):
            raise MpinnError(f"{where}: Hardtanh(min_val={low:g}, max_val={high:g}) has no mpinn "
                             "activation (only min_val=0 with a positive max_val, relu_cap)")
        return "relu_cap", high
    raise MpinnError(f"{where} is not supported: mpinn converts nn.Linear layers, each optionally "
                     "followed by ReLU, Sigmoid, Tanh, GELU, SiLU, LeakyReLU, Hardtanh(0, c), "
                     "ReLU6 or a final Softmax, and by Dropout "
                     "(Identity and Flatten are skipped)")


def _read_sequential(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], list[_Layer]]:
    """Check that ``model`` is a convertible Sequential; its leaf modules and mpinn layers."""
    nn = _torch().nn
    if not _plain(model, nn.Sequential):
        raise MpinnError(f"expected a plain torch.nn.Sequential, got {type(model).__name__}")
    if getattr(model, "_forward_hooks", None) or getattr(model, "_forward_pre_hooks", None):
        raise MpinnError("the model has forward hooks, which mpinn cannot reproduce")
    modules = _flatten(model)
    layers: list[_Layer] = []
    open_layer = False  # the last Linear has no activation module yet
    for name, module in modules:
        kind, cap = _classify(name, module)
        where = _where(name, module)
        if kind == "skip":
            continue
        if kind == "dropout":
            _read_dropout(name, module, layers, open_layer)
            continue
        if kind == "linear":
            if layers and layers[-1].activation == "softmax":
                raise MpinnError(f"{where} follows the softmax of module {layers[-1].activation_name}: "
                                 "softmax must be the last module")
            weight = module.weight
            if tuple(weight.shape) != (module.out_features, module.in_features):
                raise MpinnError(f"{where}: weight shape {tuple(weight.shape)} is not (out_features, "
                                 f"in_features) = ({module.out_features}, {module.in_features})")
            if layers and layers[-1].linear.out_features != module.in_features:
                before = layers[-1]
                raise MpinnError(f"{where} takes {module.in_features} input features but "
                                 f"{_where(before.name, before.linear)} gives {before.linear.out_features}")
            layers.append(_Layer(name, module))
            open_layer = True
        elif not layers:
            raise MpinnError(f"{where} comes before any nn.Linear; mpinn applies activations to "
                             "layer outputs only")
        elif layers[-1].dropout_name is not None and open_layer:
            raise MpinnError(f"{where} follows module {layers[-1].dropout_name} (Dropout), which "
                             "follows a Linear: mpinn drops a layer's activations after its "
                             "activation, so put the Dropout after the activation")
        elif not open_layer:
            raise MpinnError(f"{where}: two activations in a row (module {layers[-1].activation_name} "
                             f"already set the activation of {_where(layers[-1].name, layers[-1].linear)})")
        else:
            layers[-1].activation, layers[-1].activation_name = kind, name
            if kind == "leaky_relu":
                layers[-1].negative_slope = cap
            else:
                layers[-1].cap = cap
            open_layer = False
    if not layers:
        raise MpinnError("the model has no nn.Linear layer: nothing to convert")
    if layers[-1].dropout_name is not None:
        raise MpinnError(f"module {layers[-1].dropout_name} (Dropout) follows the output layer "
                         f"{_where(layers[-1].name, layers[-1].linear)}; mpinn drops the "
                         "activations of hidden layers only")
    return modules, layers


def _read_dropout(name: str, module: torch.nn.Module, layers: list[_Layer],
                  open_layer: bool) -> None:
    """Make a Dropout the rate of the hidden layer it follows, or refuse where it cannot be."""
    where, p = _where(name, module), float(module.p)
    if not layers:
        raise MpinnError(f"{where} comes before any nn.Linear: mpinn has no dropout on the "
                         "inputs, only on the activations of hidden layers")
    if layers[-1].dropout_name is not None:
        raise MpinnError(f"{where} follows module {layers[-1].dropout_name}, another Dropout; "
                         "mpinn keeps one dropout rate per layer")
    if not 0 < p < 1:
        raise MpinnError(f"{where}: dropout probability {p:g} is not in (0, 1)")
    layers[-1].dropout, layers[-1].dropout_name = p, name


# ---------------------------------------------------------------- torch -> mpinn


def from_torch(model: torch.nn.Module, path: str, dtype: str | None = None) -> None:
    """Write the Sequential ``model`` as the mpinn model file ``path`` (see the module docstring).

    ``dtype`` (float32 or float64) defaults to the Linear weights' dtype; the file is written
    atomically by one process. Each Dropout becomes the dropout rate of the hidden layer
    it follows (used by training; inference computes ``model.eval()``).
    """
    torch = _torch()
    _, layers = _read_sequential(model)
    if dtype is None:
        found = {str(p.dtype).removeprefix("torch.") for ly in layers for p in ly.linear.parameters()}
        if len(found) != 1 or next(iter(found)) not in DTYPES:
            raise MpinnError(f"the model's Linear parameters are {', '.join(sorted(found))}; pass "
                             "dtype='float32' or 'float64' to convert them")
        dtype = found.pop()
    if dtype not in DTYPES:
        raise MpinnError(f"dtype {dtype!r} is not supported (float32 or float64)")
    torch_dtype = getattr(torch, dtype)
    sizes = [layers[0].linear.in_features] + [ly.linear.out_features for ly in layers]

    def arrays() -> Iterator[LayerArrays]:
        with torch.no_grad():
            for ly in layers:
                weight = ly.linear.weight.detach().to(device="cpu", dtype=torch_dtype).numpy()
                bias = (np.zeros(ly.linear.out_features, dtype=dtype) if ly.linear.bias is None
                        else ly.linear.bias.detach().to(device="cpu", dtype=torch_dtype).numpy())
                yield LayerArrays(ly.activation, weight, bias, ly.cap, ly.negative_slope,
                                  ly.dropout)

    write_model(path, sizes, arrays(), dtype)


# ---------------------------------------------------------------- mpinn -> torch


def to_torch(path: str) -> torch.nn.Sequential:
    """Build the mpinn model file ``path`` as a Sequential of Linear and activation modules.

    Every layer becomes a dense ``nn.Linear`` in the file's dtype (CSR layers with zeros off
    their pattern: torch does not keep it) followed by its activation module; identity layers
    get none; a layer with a dropout rate p gets an ``nn.Dropout(p)`` after it. The model
    is returned in eval mode and gives the file's outputs.
    """
    torch = _torch()
    nn = torch.nn
    with opened(path, "r", MPI.COMM_SELF) as f:
        spec = read_spec(f)
        dense_bytes = sum(ly.n_in * ly.n_out for ly in spec.layers) * spec.dtype.itemsize
        if dense_bytes > available_memory():
            raise MpinnError(f"{path}: its layers as dense torch weights need "
                             f"{dense_bytes / 2**30:.1f} GiB, more than this machine has free")
        torch_dtype = getattr(torch, spec.dtype.name)
        modules: list[torch.nn.Module] = []
        for ly in spec.layers:
            linear = nn.utils.skip_init(nn.Linear, ly.n_in, ly.n_out, dtype=torch_dtype)
            weight, bias = read_layer(f, ly)
            if ly.sparse:  # zeros where the layer has no connection
                weight = weight.toarray()
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=spec.dtype)))
                linear.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=spec.dtype)))
            modules.append(linear)
            if ly.activation == "relu":
                modules.append(nn.ReLU())
            elif ly.activation == "relu_cap":
                modules.append(nn.Hardtanh(0.0, float(ly.cap)))
            elif ly.activation == "sigmoid":
                modules.append(nn.Sigmoid())
            elif ly.activation == "tanh":
                modules.append(nn.Tanh())
            elif ly.activation == "gelu":
                modules.append(nn.GELU())
            elif ly.activation == "silu":
                modules.append(nn.SiLU())
            elif ly.activation == "leaky_relu":
                modules.append(nn.LeakyReLU(ly.negative_slope))
            elif ly.activation == "softmax":
                modules.append(nn.Softmax(dim=-1))
            if ly.dropout:
                modules.append(nn.Dropout(ly.dropout))
    return nn.Sequential(*modules).eval()


# ---------------------------------------------------------------- torch model files


def _describe(module: torch.nn.Module) -> list[Any]:
    """The ``mpinn_sequential`` entry of one leaf module (already checked convertible)."""
    nn = _torch().nn
    if isinstance(module, nn.Linear):
        return ["linear", module.in_features, module.out_features, module.bias is not None]
    if isinstance(module, nn.Softmax):
        return ["softmax", int(module.dim)]
    if isinstance(module, nn.Hardtanh):
        return ["hardtanh", float(module.min_val), float(module.max_val)]
    if isinstance(module, nn.Dropout):
        return ["dropout", float(module.p)]
    if isinstance(module, nn.LeakyReLU):
        return ["leaky_relu", float(module.negative_slope)]
    if isinstance(module, nn.Flatten):
        return ["flatten", int(module.start_dim), int(module.end_dim)]
    simple = ((nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Identity, "identity"),
              (nn.GELU, "gelu"), (nn.SiLU, "silu"))
    for cls, kind in simple:
        if isinstance(module, cls):
            return [kind]
    raise MpinnError(f"cannot describe {type(module).__name__}")  # unreachable after _read_sequential


def save_torch_file(model: torch.nn.Sequential, path: str) -> None:
    """Save a convertible Sequential in the safe file format of the module docstring.

    Nested Sequentials are flattened; the file is written atomically and holds only
    lists, numbers, strings and tensors, so ``load_torch_file`` never unpickles code.
    """
    torch = _torch()
    modules, _ = _read_sequential(model)
    description = [_describe(module) for _, module in modules]
    state: dict[str, torch.Tensor] = {}
    for position, (_, module) in enumerate(modules):
        for key in ("weight", "bias"):
            value = getattr(module, key, None) if isinstance(module, torch.nn.Linear) else None
            if value is not None:
                state[f"{position}.{key}"] = value.detach().to("cpu").clone().contiguous()
    with staged(path) as partial:
        torch.save({"mpinn_sequential": description, "state_dict": state}, partial)


def _number(value: Any, where: str, what: str, kind: type) -> Any:
    """``value`` if it is a ``kind`` number (never a bool), else a clear error."""
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        raise MpinnError(f"{where}: {what} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}")
    return value


def _build_module(entry: Any, position: int, state: dict[str, Any], where: str) -> torch.nn.Module:
    """The module of one ``mpinn_sequential`` entry, its tensors checked against the entry."""
    torch = _torch()
    nn = torch.nn
    where = f"{where}: mpinn_sequential[{position}]"
    if not isinstance(entry, (list, tuple)) or not entry or not isinstance(entry[0], str):
        raise MpinnError(f"{where} must be a list starting with the module kind, got {entry!r}")
    kind, args = entry[0], list(entry[1:])
    arity = {"linear": 3, "relu": 0, "sigmoid": 0, "tanh": 0, "identity": 0, "softmax": 1,
             "hardtanh": 2, "dropout": 1, "flatten": 2, "gelu": 0, "silu": 0, "leaky_relu": 1}
    if kind not in arity:
        raise MpinnError(f"{where}: unknown module kind {kind!r} (known: {', '.join(arity)})")
    if len(args) != arity[kind]:
        raise MpinnError(f"{where}: {kind} takes {arity[kind]} parameters, got {len(args)}")
    if kind == "linear":
        n_in, n_out = (_number(v, where, name, int) for v, name in zip(args[:2], ("in", "out"), strict=True))
        if not isinstance(args[2], bool):
            raise MpinnError(f"{where}: has_bias must be true or false, got {args[2]!r}")
        shapes = {"weight": (n_out, n_in), "bias": (n_out,)} if args[2] else {"weight": (n_out, n_in)}
        tensors = {}
        for key, shape in shapes.items():
            value = state.get(f"{position}.{key}")
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape \
                    or not value.is_floating_point():
                found = (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                         else "nothing")
                raise MpinnError(f"{where}: state_dict['{position}.{key}'] must be a float tensor of "
                                 f"shape {shape}, found {found}")
            tensors[key] = value
        linear = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=args[2], dtype=tensors["weight"].dtype)
        with torch.no_grad():
            for key, value in tensors.items():
                getattr(linear, key).copy_(value)
        return linear
    if kind == "softmax":
        return nn.Softmax(dim=_number(args[0], where, "dim", int))
    if kind == "hardtanh":
        low, high = (float(_number(v, where, name, float))
                     for v, name in zip(args, ("min", "max"), strict=True))
        return nn.Hardtanh(low, high)
    if kind == "dropout":
        p = float(_number(args[0], where, "p", float))
        if not 0 <= p <= 1:
            raise MpinnError(f"{where}: dropout probability {p} is not in [0, 1]")
        return nn.Dropout(p)
    if kind == "flatten":
        return nn.Flatten(*(_number(v, where, "a flatten dim", int) for v in args))
    if kind == "leaky_relu":
        return nn.LeakyReLU(float(_number(args[0], where, "negative_slope", float)))
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "identity": nn.Identity,
            "gelu": nn.GELU, "silu": nn.SiLU}[kind]()


def _unpickler_detail(exc: Exception) -> str:
    """The line of torch's weights_only error that names what was refused, if there is one."""
    _, marker, rest = str(exc).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    if not marker or not lines:
        return ""
    return f" ({lines[0].split('. ')[0].rstrip('.')})"


def load_torch_file(path: str, activation: str | None = None,
                    output: str | None = None) -> torch.nn.Module:
    """Load a model saved by ``save_torch_file`` (format: module docstring) as a Sequential.

    Also a plain ``torch.save(model.state_dict())`` of an ``nn.Sequential`` of ``Linear``
    layers (keys ``<position>.weight`` and ``<position>.bias``, with an optional common
    prefix such as ``net.``), whose activations are not in the file: ``activation`` (the
    hidden layers') and ``output`` (the last layer's) name them, as mpinn activations.
    The file is read with ``torch.load(weights_only=True)``: a file holding anything but
    lists, numbers, strings and tensors (a pickled ``nn.Module``, arbitrary objects) is
    refused without running any of its code. The model is returned in eval mode.
    """
    torch = _torch()
    if not os.path.exists(path):
        raise MpinnError(f"{path}: no such file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler's refusals and corrupt archives alike
        raise MpinnError(f"{path}: refused by torch.load(weights_only=True){_unpickler_detail(exc)}: "
                         "it is not a torch.save file of only tensors, numbers, strings and "
                         "containers; other Python objects (a whole pickled nn.Module, for one) "
                         "are never unpickled since that could run code from the file. Save the "
                         "model with mpinn.io.pytorch.save_torch_file(model, path)") from None
    if isinstance(content, dict) and "mpinn_sequential" not in content and content \
            and all(isinstance(v, torch.Tensor) for v in content.values()):
        return _from_state_dict(content, activation, output, path)
    if not isinstance(content, dict) or "mpinn_sequential" not in content:
        what = "a bare state_dict" if isinstance(content, dict) else f"a {type(content).__name__}"
        raise MpinnError(f"{path} holds {what}, not an mpinn_sequential description (a state_dict "
                         "alone has no activations); save the model with "
                         "mpinn.io.pytorch.save_torch_file(model, path)")
    unknown = sorted(set(map(str, content)) - set(FILE_KEYS))
    if unknown or not isinstance(content.get("state_dict"), dict):
        raise MpinnError(f"{path}: expected exactly the keys {', '.join(FILE_KEYS)} (a dict of "
                         f"tensors); unknown keys: {', '.join(unknown) or 'none'}")
    description, state = content["mpinn_sequential"], content["state_dict"]
    if not isinstance(description, (list, tuple)):
        raise MpinnError(f"{path}: mpinn_sequential must be a list of module entries")
    modules = [_build_module(entry, position, state, path) for position, entry in enumerate(description)]
    model = torch.nn.Sequential(*modules)
    extra = sorted(set(map(str, state)) - set(model.state_dict()))
    if extra:
        raise MpinnError(f"{path}: state_dict has entries no module uses: {', '.join(extra[:5])}")
    if activation is not None:
        raise MpinnError(f"--activation names the activations of a bare state_dict; {path} "
                         "holds its own")
    if output is not None:
        model = with_output(model, output, path)
    return model.eval()


def ends_in_logits(model: torch.nn.Module) -> bool:
    """Whether the Sequential's last Linear has no activation after it: its outputs are
    logits, and mpinn's identity output trains them with squared error, not cross-entropy."""
    return _read_sequential(model)[1][-1].activation == "identity"


def with_output(model: torch.nn.Sequential, output: str, path: str) -> torch.nn.Sequential:
    """``model`` with the output activation ``output`` after its last Linear (softmax: a
    classifier that ends in logits, as trained with ``nn.CrossEntropyLoss``, predicts the same
    classes and trains with cross-entropy); only for a model that ends in a Linear."""
    if not ends_in_logits(model):
        raise MpinnError(f"--output applies to a model that ends in a Linear (logits); {path} "
                         "ends in an activation of its own")
    check_activation(output, True, "--output")
    module = activation_module(output)
    return model if module is None else _torch().nn.Sequential(*model, module)


def activation_module(name: str, slope: float | None = None) -> torch.nn.Module | None:
    """The torch module of an mpinn activation (None for identity); relu_cap is refused here
    (it needs its cap)."""
    nn = _torch().nn
    modules = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU,
               "silu": nn.SiLU}
    if name == "identity":
        return None
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01 if slope is None else slope)
    if name == "softmax":
        return nn.Softmax(dim=-1)
    if name not in modules:
        known = ", ".join(["identity", "leaky_relu", "softmax", *modules])
        raise MpinnError(f"activation {name!r} cannot be given for a state_dict (known: {known})")
    return modules[name]()


def _from_state_dict(state: dict[str, Any], activation: str | None, output: str | None,
                     path: str) -> torch.nn.Module:
    """A Sequential of the Linear layers in a bare state_dict and the named activations."""
    torch = _torch()
    nn = torch.nn
    if activation is None or output is None:
        raise MpinnError(f"{path} holds a bare state_dict: it has no activations, so give them "
                         "(--activation for the hidden layers and --output for the last, e.g. "
                         "--activation relu --output softmax)")
    positions: dict[int, dict[str, Any]] = {}
    prefixes = set()
    for key, value in state.items():
        head, _, name = str(key).rpartition(".")
        prefix, _, position = head.rpartition(".")
        if name not in ("weight", "bias") or not position.isdigit():
            raise MpinnError(f"{path}: state_dict key {key!r} is not '<position>.weight' or "
                             "'<position>.bias' of an nn.Sequential of Linear layers")
        prefixes.add(prefix)
        positions.setdefault(int(position), {})[name] = value
    if len(prefixes) > 1:
        raise MpinnError(f"{path}: state_dict keys have several prefixes "
                         f"({', '.join(sorted(repr(p) for p in prefixes))}); expected one Sequential")
    modules: list[torch.nn.Module] = []
    previous_out: int | None = None
    order = sorted(positions)
    for i, position in enumerate(order):
        tensors = positions[position]
        weight = tensors.get("weight")
        where = f"{path}: layer at position {position}"
        if weight is None or weight.ndim != 2 or not weight.is_floating_point():
            raise MpinnError(f"{where} has no 2-D float weight (only Linear layers are converted)")
        n_out, n_in = weight.shape
        bias = tensors.get("bias")
        if bias is not None and tuple(bias.shape) != (n_out,):
            raise MpinnError(f"{where}: bias shape {tuple(bias.shape)} is not ({n_out},)")
        if previous_out is not None and previous_out != n_in:
            raise MpinnError(f"{where} takes {n_in} inputs but the layer before gives "
                             f"{previous_out}")
        previous_out = n_out
        linear = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias is not None,
                                    dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        modules.append(linear)
        act = activation_module(output if i == len(order) - 1 else activation)
        if act is not None:
            if isinstance(act, nn.Softmax) and i < len(order) - 1:
                raise MpinnError("softmax is only allowed on the last layer (--output)")
            modules.append(act)
    return nn.Sequential(*modules).eval()
