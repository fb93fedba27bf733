"""The VirNucPro MLP classifier: read the published weights safely, score features (SPEC 5).

The published `300_model.pth` / `500_model.pth` are whole pickled modules
(`torch.save(model)` of a `__main__.MLPClassifier`). Plain unpickling would execute whatever
the file names, so they are read with an allow-list unpickler (see `_RestrictedUnpickler`)
that rebuilds tensors and nothing else, and can be converted once into safetensors, which
carries the chunk length the classifier was trained with in its metadata.
"""
from __future__ import annotations

import os
import pickle
import re
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ModelLoadError, UserError
from core.frames import KNOWN_CHUNK_LENGTHS

NUM_CLASSES = 2  # class 0 "others" (score1), class 1 "virus" (score2)
SAFETENSORS_FORMAT = "virnucpro-mlp"
_BN_EPS = 1e-5  # nn.BatchNorm1d's default, which the published model uses

PathLike = str | os.PathLike[str]


class ChunkLengthMismatch(UserError, ValueError):
    """The requested chunk length is not the one the classifier was trained with."""


class ChunkLengthUnknown(UserError, ValueError):
    """Neither the classifier nor the command line says which chunk length to use."""


class MLPClassifier(nn.Module):
    """The published classifier, layer for layer and name for name.

    Attribute order and the functional ReLU follow upstream `train.py`/`prediction.py`, so a
    pickled instance has the layout of the published files (`write_demo_classifier` relies
    on that). Dropout is the identity in eval mode, where this model is always used.
    """

    def __init__(self, input_dim: int, hidden_dim: int, num_class: int = NUM_CLASSES) -> None:
        super().__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, num_class)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.hidden_layer(x)))
        return self.output_layer(self.dropout(x))


@dataclass(frozen=True)
class Classifier:
    """A loaded classifier in eval mode, with the chunk length it was trained for (if known)."""

    model: MLPClassifier
    chunk_length: int | None
    path: str

    @property
    def input_dim(self) -> int:
        return self.model.hidden_layer.in_features

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities [n, 2] (float32) for features [n, input_dim], on the
        classifier's device (no wait for the device: the pipeline queues this behind the
        encoders and copies the result back itself).

        The softmax is taken in float32 whatever the device, as the published tool did. On
        the CPU each row is scored alone: its kernels round a row by its place in the batch
        and the batch's shape (differently on AVX2 and AVX-512 processors), and a frame's
        score should be a function of its features, whatever else its group holds.
        """
        if features.ndim != 2 or features.shape[1] != self.input_dim:
            raise ValueError(
                f"classifier {self.path} expects features [n, {self.input_dim}], "
                f"got {list(features.shape)}"
            )
        device = self.model.hidden_layer.weight.device
        with torch.no_grad():
            features = features.to(device=device, dtype=torch.float32)
            if device.type == "cpu":
                logits = torch.cat([self.model(row) for row in features.split(1)]) if len(features) else self.model(features)
            else:
                logits = self.model(features)
            return torch.softmax(logits.float(), dim=1)


# --- reading pickled modules without running them ------------------------------------------

# Every module class a published file may name; each is replaced by an inert stand-in.
_LINEAR = "torch.nn.modules.linear.Linear"
_BATCHNORM = "torch.nn.modules.batchnorm.BatchNorm1d"
_RELU = "torch.nn.modules.activation.ReLU"
_DROPOUT = "torch.nn.modules.dropout.Dropout"
_PUBLISHED_CLASS = "__main__.MLPClassifier"
_MODULE_CLASSES = (_PUBLISHED_CLASS, _LINEAR, _BATCHNORM, _RELU, _DROPOUT)

# Children of the published module: required ones carry the weights; upstream uses
# F.relu, but a variant with an `nn.ReLU()` child computes the same function.
_REQUIRED_CHILDREN = {"hidden_layer": _LINEAR, "bn1": _BATCHNORM, "output_layer": _LINEAR}
_OPTIONAL_CHILDREN = {"dropout": _DROPOUT, "relu": _RELU}

# The only callables a file may reach: tensor/parameter rebuilding and two containers.
_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,  # protocol 2 writes it as __builtin__.set
    ("__builtin__", "set"): set,
}


class _PickledModule:
    """Inert stand-in for a pickled `nn.Module`: unpickling only stores its attribute dict."""

    pickled_class = ""
    state: Mapping[str, Any] = types.MappingProxyType({})  # until unpickling sets it

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict):
            raise ModelLoadError(f"pickled {self.pickled_class} has a malformed state")
        self.state = state

    def entries(self, key: str) -> dict[str, Any]:
        """One of the module's name -> value tables (`_parameters`, `_buffers`, `_modules`)."""
        table = self.state.get(key, {})
        if not isinstance(table, Mapping):
            raise ModelLoadError(f"pickled {self.pickled_class} has a malformed {key}")
        return {name: value for name, value in table.items() if value is not None}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals from a fixed allow-list only; anything else is refused by name.

    Unpickling can only call what `find_class` returns (REDUCE, NEWOBJ, INST, OBJ and EXT
    all go through it; torch resolves `*Storage` names to its inert `StorageType` itself,
    and reads tensor bytes through its own `persistent_load`). Nothing is imported.
    Callables and stand-in classes are fresh per unpickler, so a file that sets attributes
    on them (pickle's BUILD can) cannot tamper with torch or with later loads.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._globals: dict[tuple[str, str], Any] = {
            key: _private_copy(function) for key, function in _CALLABLES.items()
        }
        for qualified in _MODULE_CLASSES:
            module, _, name = qualified.rpartition(".")
            stand_in = type(name, (_PickledModule,), {"pickled_class": qualified})
            self._globals[module, name] = stand_in

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[module, name]
        except KeyError:
            raise ModelLoadError(
                f"refusing to unpickle global {module}.{name}: a classifier file may only "
                "contain tensors and the published MLPClassifier layers"
            ) from None


def _private_copy(function: Callable[..., Any]) -> Callable[..., Any]:
    """A per-load wrapper, so pickle's BUILD cannot set attributes on the real object."""
    if isinstance(function, type):  # OrderedDict, set: built-in types refuse new attributes
        return function

    def call(*args: Any) -> Any:
        return function(*args)

    return call


def _load_restricted(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# What torch.load(pickle_module=...) needs: `Unpickler`, `load` and a `__name__`.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="virnucpro_restricted_pickle", Unpickler=_RestrictedUnpickler, load=_load_restricted
)


def _read_torch_file(path: str) -> Any:
    """Unpickle a zip-format torch file with the allow-list, tensors mapped to CPU.

    Legacy (pre-1.6, non-zip) files are refused: they take a different torch code path
    that is not worth vetting for files nobody publishes any more. TorchScript archives are
    refused because torch.load would hand them to torch.jit.load, which runs their code.
    """
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path} is not a zip-format torch file (torch >= 1.6 writes one)")
    with zipfile.ZipFile(path) as archive:
        if any(name.rpartition("/")[2] == "constants.pkl" for name in archive.namelist()):
            raise ModelLoadError(f"{path} is a TorchScript archive, not a classifier weight file")
    try:
        return torch.load(
            path, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False
        )
    except (ModelLoadError, OSError):
        raise
    except Exception as error:  # torch/pickle raise many types for a damaged file
        raise ModelLoadError(f"cannot read {path} as a torch file: {error}") from error


def _state_dict_from_pickle(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """Weights of a published module pickle, or the entries of a plain state dict."""
    if isinstance(obj, _PickledModule):
        return _state_dict_from_module(obj, path)
    if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
        return dict(obj)
    raise ModelLoadError(f"{path} holds neither an MLPClassifier nor a state dict")


def _state_dict_from_module(root: _PickledModule, path: str) -> dict[str, torch.Tensor]:
    """Collect `_parameters` and `_buffers` of the published module's children."""
    if root.pickled_class != _PUBLISHED_CLASS:
        raise ModelLoadError(f"{path} holds a {root.pickled_class}, not {_PUBLISHED_CLASS}")
    children = root.entries("_modules")
    expected = {**_REQUIRED_CHILDREN, **_OPTIONAL_CHILDREN}
    for name, child in children.items():
        if not isinstance(child, _PickledModule) or expected.get(name) != child.pickled_class:
            found = getattr(child, "pickled_class", type(child).__name__)
            raise ModelLoadError(f"{path}: unexpected layer {name} ({found}) in MLPClassifier")
    missing = sorted(set(_REQUIRED_CHILDREN) - set(children))
    if missing:
        raise ModelLoadError(f"{path}: MLPClassifier lacks layers {', '.join(missing)}")
    eps = children["bn1"].state.get("eps")
    if eps != _BN_EPS:
        raise ModelLoadError(f"{path}: bn1 eps is {eps}, expected {_BN_EPS}")
    state: dict[str, torch.Tensor] = {}
    for owner, module in [("", root), *((f"{name}.", child) for name, child in children.items())]:
        if owner and module.entries("_modules"):
            raise ModelLoadError(f"{path}: layer {owner[:-1]} has unexpected sublayers")
        for key in ("_parameters", "_buffers"):
            state.update({owner + name: value for name, value in module.entries(key).items()})
    return state


# --- validating and building -----------------------------------------------------------------


def _build_model(
    state: Mapping[str, Any], source: str, model_class: type[MLPClassifier] = MLPClassifier
) -> MLPClassifier:
    """Check names, shapes and dtypes against the published layout; build an eval model.

    The layers are created on the meta device and the given tensors assigned, so building
    neither allocates twice nor draws from the caller's random number generator.
    """
    weight = state.get("hidden_layer.weight")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ModelLoadError(f"{source}: no 2-D hidden_layer.weight, not an MLPClassifier")
    hidden_dim, input_dim = weight.shape
    with torch.device("meta"):
        model = model_class(input_dim, hidden_dim)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{source} does not have the MLPClassifier layout: missing {missing or 'nothing'}, "
            f"unexpected {unexpected or 'nothing'}"
        )
    for name, reference in expected.items():
        value = state[name]
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ModelLoadError(f"{source}: {name} is {shape}, expected {list(reference.shape)}")
        if value.is_floating_point() != reference.is_floating_point():
            raise ModelLoadError(
                f"{source}: {name} has dtype {value.dtype}, expected {reference.dtype}"
            )
    converted = {
        name: state[name].detach().to(device="cpu", dtype=reference.dtype)
        for name, reference in expected.items()
    }
    model.load_state_dict(converted, assign=True)
    return model.eval()


def chunk_length_from_name(path: PathLike) -> int | None:
    """300 or 500 when the file name holds exactly one of them as a standalone number."""
    found = {int(n) for n in re.findall(r"(?<!\d)(\d+)(?!\d)", Path(path).name)}
    known = found & set(KNOWN_CHUNK_LENGTHS)
    return known.pop() if len(known) == 1 else None


def load_classifier(path: PathLike, device: torch.device | str) -> Classifier:
    """Load a `.safetensors` (ours) or `.pth` (published module pickle or state dict) file.

    The chunk length comes from safetensors metadata, else from the file name.
    Raises ModelLoadError when the file is unsafe, damaged or not an MLPClassifier.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"classifier {path} does not exist; check the path")
    if path.endswith(".safetensors"):
        state, chunk_length = _read_safetensors(path)
    else:
        state = _state_dict_from_pickle(_read_torch_file(path), path)
        chunk_length = chunk_length_from_name(path)
    model = _build_model(state, path).to(device)
    return Classifier(model=model, chunk_length=chunk_length, path=path)


def check_chunk_length(classifier: Classifier, chunk_length: int | None, force: bool) -> int:
    """The chunk length to run with: the requested one, checked against the classifier's.

    A mismatch gives meaningless scores (SPEC 5), so it is refused unless forced. When the
    classifier's own chunk length is unknown, the requested one is trusted as given.
    """
    if chunk_length is not None and chunk_length <= 0:
        raise ValueError(f"chunk length must be positive, got {chunk_length}")
    known = classifier.chunk_length
    if chunk_length is None:
        if known is None:
            raise ChunkLengthUnknown(
                f"cannot tell the chunk length of classifier {classifier.path}: its name holds "
                f"neither {' nor '.join(map(str, KNOWN_CHUNK_LENGTHS))} and it has no metadata; "
                "pass --chunk-length"
            )
        return known
    if known is not None and known != chunk_length and not force:
        raise ChunkLengthMismatch(
            f"chunk length {chunk_length} does not match classifier {classifier.path}, which "
            f"was trained on chunk length {known}; scores would be meaningless. Pass "
            f"--force-chunk-length to use {chunk_length} anyway"
        )
    return chunk_length


# --- safetensors -----------------------------------------------------------------------------


def save_safetensors(
    model_or_state: nn.Module | Mapping[str, torch.Tensor], path: PathLike, chunk_length: int
) -> None:
    """Write a validated classifier state dict with its chunk length in the metadata.

    Written to a temporary name and renamed, so a crash never leaves a loadable half file.
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise UserError(f"{path}: a safetensors classifier file must end in .safetensors")
    if chunk_length <= 0:
        raise ValueError(f"chunk length must be positive, got {chunk_length}")
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    model = _build_model(state, path)  # refuse to write anything we could not load
    tensors = {name: value.contiguous() for name, value in model.state_dict().items()}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "chunk_length": str(chunk_length),
        "input_dim": str(model.hidden_layer.in_features),
        "hidden_dim": str(model.hidden_layer.out_features),
    }
    partial = f"{path}.partial"
    safetensors.torch.save_file(tensors, partial, metadata=metadata)
    os.chmod(partial, 0o644)  # safetensors writes 0600: readable like the .pth (the image runs as another user)
    os.replace(partial, path)


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """State dict and chunk length (metadata first, then file name) of a safetensors file."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except safetensors.SafetensorError as error:
        raise ModelLoadError(f"cannot read {path} as safetensors: {error}") from error
    if metadata.get("format", SAFETENSORS_FORMAT) != SAFETENSORS_FORMAT:
        raise ModelLoadError(f"{path} is a {metadata['format']!r} file, not {SAFETENSORS_FORMAT!r}")
    if "chunk_length" not in metadata:
        return state, chunk_length_from_name(path)
    text = metadata["chunk_length"]
    if not text.isdecimal() or int(text) <= 0:
        raise ModelLoadError(f"{path}: bad chunk_length metadata {text!r}")
    return state, int(text)


def convert_classifier(
    in_path: PathLike, out_path: PathLike, chunk_length: int | None = None
) -> int:
    """Convert a classifier (published .pth or ours) to safetensors; return its chunk length.

    Without `chunk_length` it is taken from the input (name or metadata); an input whose
    chunk length is unknown is refused, as is one that contradicts `chunk_length`.
    """
    classifier = load_classifier(in_path, "cpu")
    chunk = check_chunk_length(classifier, chunk_length, force=False)
    save_safetensors(classifier.model, out_path, chunk)
    return chunk


# --- demo weights ----------------------------------------------------------------------------


def write_demo_classifier(
    pth_path: PathLike,
    safetensors_path: PathLike,
    *,
    input_dim: int,
    hidden_dim: int = 512,
    chunk_length: int = 500,
    seed: int = 0,
) -> None:
    """Write a random classifier pickled the published way, plus its safetensors twin.

    The .pth is `torch.save` of a whole module whose class is `__main__.MLPClassifier`, so
    tests and demo runs exercise the same loader path as the real files. BatchNorm running
    statistics are random too, so scores depend on eval mode being honoured.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int, scale: float, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale + offset

    state = {
        "hidden_layer.weight": draw(hidden_dim, input_dim, scale=2.0 / input_dim**0.5),
        "hidden_layer.bias": draw(hidden_dim, scale=0.1),
        "bn1.weight": draw(hidden_dim, scale=0.2, offset=1.0),
        "bn1.bias": draw(hidden_dim, scale=0.1),
        "bn1.running_mean": draw(hidden_dim, scale=0.5),
        "bn1.running_var": torch.rand(hidden_dim, generator=generator) * 1.5 + 0.5,
        "bn1.num_batches_tracked": torch.tensor(1000),
        "output_layer.weight": draw(NUM_CLASSES, hidden_dim, scale=2.0 / hidden_dim**0.5),
        "output_layer.bias": draw(NUM_CLASSES, scale=0.1),
    }
    published = type(
        "MLPClassifier",
        (MLPClassifier,),
        {"__module__": "__main__", "__qualname__": "MLPClassifier"},
    )
    model = _build_model(state, "demo classifier", model_class=published)
    _save_as_main_module(model, pth_path)
    save_safetensors(model, safetensors_path, chunk_length)


def _save_as_main_module(model: nn.Module, path: PathLike) -> None:
    """`torch.save(model)` with its class reachable as `__main__.<name>`, as pickle requires.

    The class is registered on `__main__` only for the duration of the save (not
    thread-safe against other code touching the same `__main__` attribute).
    """
    main = sys.modules["__main__"]
    name = type(model).__qualname__
    absent = object()
    previous = main.__dict__.get(name, absent)
    setattr(main, name, type(model))
    try:
        torch.save(model, path)
    finally:
        if previous is absent:
            delattr(main, name)
        else:
            setattr(main, name, previous)
