"""core.classifier: safe reading of the published module pickles, scores, chunk lengths."""
from __future__ import annotations

import builtins
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import safetensors
import torch

from core.classifier import (
    ChunkLengthMismatch,
    ChunkLengthUnknown,
    Classifier,
    MLPClassifier,
    check_chunk_length,
    chunk_length_from_name,
    convert_classifier,
    load_classifier,
    save_safetensors,
    write_demo_classifier,
)
from core.errors import ModelLoadError

INPUT_DIM, HIDDEN_DIM = 24, 16
Demo = tuple[Path, Path]  # a published-style .pth and its safetensors twin

# The published tool's script shape: MLPClassifier defined in __main__, whole module saved.
# Brief/SPEC variant with an nn.ReLU child, and upstream train.py's variant with F.relu.
PUBLISHED_SCRIPT = """
import sys
import torch
import torch.nn.functional as F
from torch import nn

class MLPClassifier(nn.Module):
    def __init__(self, input_dim, hidden_dim, num_class):
        super().__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        {layers}
        self.dropout = nn.Dropout(0.5)
        self.bn1 = nn.BatchNorm1d(hidden_dim)

    def forward(self, x):
        x = self.hidden_layer(x)
        x = self.bn1(x)
        x = {relu}
        x = self.dropout(x)
        return self.output_layer(x)

model_path, scores_path = sys.argv[1:3]
torch.manual_seed(1)
model = MLPClassifier({input_dim}, {hidden_dim}, 2)
with torch.no_grad():
    model.bn1.running_mean.normal_(0, 0.5)
    model.bn1.running_var.uniform_(0.5, 2.0)
    model.bn1.weight.normal_(1.0, 0.2)
    model.bn1.bias.normal_(0, 0.1)
    model.bn1.num_batches_tracked.fill_(123)
model.eval()
x = torch.randn(32, {input_dim})
with torch.no_grad():
    scores = torch.softmax(model(x), dim=1)
torch.save(model, model_path)
torch.save({{"x": x, "scores": scores}}, scores_path)
"""
LAYOUTS = {
    "relu-module": ("self.output_layer = nn.Linear(hidden_dim, num_class); self.relu = nn.ReLU()",
                    "self.relu(x)"),
    "functional-relu": ("self.output_layer = nn.Linear(hidden_dim, num_class)", "F.relu(x)"),
}


def run_script(tmp_path: Path, source: str, *args: str) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    subprocess.run([sys.executable, str(script), *args], check=True, cwd=tmp_path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    directory = tmp_path_factory.mktemp("demo")
    pth, st = directory / "500_model.pth", directory / "500_model.safetensors"
    write_demo_classifier(str(pth), str(st), input_dim=INPUT_DIM, hidden_dim=HIDDEN_DIM)
    return pth, st


def features(n: int = 10, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, INPUT_DIM, generator=torch.Generator().manual_seed(seed))


# --- the published format --------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_published_pickle_scores_match_its_own_forward(tmp_path: Path, layout: str) -> None:
    layers, relu = LAYOUTS[layout]
    source = PUBLISHED_SCRIPT.format(
        layers=layers, relu=relu, input_dim=INPUT_DIM, hidden_dim=HIDDEN_DIM
    )
    model_path, scores_path = tmp_path / "500_model.pth", tmp_path / "scores.pt"
    run_script(tmp_path, source, str(model_path), str(scores_path))
    expected = torch.load(scores_path, weights_only=True)

    classifier = load_classifier(str(model_path), torch.device("cpu"))

    assert classifier.chunk_length == 500
    assert classifier.input_dim == INPUT_DIM
    scores = classifier.score(expected["x"])
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, expected["scores"], atol=1e-6, rtol=0)


def test_state_dict_pth_loads(tmp_path: Path, demo: Demo) -> None:
    published = load_classifier(str(demo[0]), "cpu")
    path = tmp_path / "classifier_300.pth"
    torch.save(published.model.state_dict(), path)

    classifier = load_classifier(str(path), "cpu")

    assert classifier.chunk_length == 300
    assert torch.equal(classifier.score(features()), published.score(features()))


def test_demo_classifier_is_pickled_the_published_way(tmp_path: Path, demo: Demo) -> None:
    """A script that defines the upstream class in __main__ can torch.load the demo file."""
    x_path, scores_path = tmp_path / "x.pt", tmp_path / "scores.pt"
    torch.save(features(), x_path)
    run_script(tmp_path, """
        import sys
        import torch
        import torch.nn.functional as F
        from torch import nn

        class MLPClassifier(nn.Module):
            def forward(self, x):
                return self.output_layer(self.dropout(F.relu(self.bn1(self.hidden_layer(x)))))

        model = torch.load(sys.argv[1], weights_only=False).eval()
        with torch.no_grad():
            torch.save(torch.softmax(model(torch.load(sys.argv[2])), dim=1), sys.argv[3])
    """, str(demo[0]), str(x_path), str(scores_path))

    ours = load_classifier(str(demo[0]), "cpu").score(features())

    torch.testing.assert_close(ours, torch.load(scores_path, weights_only=True), atol=1e-6, rtol=0)


def test_demo_batchnorm_statistics_matter(demo: Demo) -> None:
    model = load_classifier(str(demo[0]), "cpu").model
    assert not torch.allclose(model.bn1.running_mean, torch.zeros(HIDDEN_DIM))
    assert not torch.allclose(model.bn1.running_var, torch.ones(HIDDEN_DIM))


def test_demo_leaves_main_and_global_rng_alone(tmp_path: Path) -> None:
    main = sys.modules["__main__"]
    had = "MLPClassifier" in vars(main)
    before = torch.random.get_rng_state()

    write_demo_classifier(tmp_path / "a.pth", tmp_path / "a.safetensors", input_dim=4, hidden_dim=3)

    assert ("MLPClassifier" in vars(main)) == had
    assert torch.equal(torch.random.get_rng_state(), before)


# --- refusing code ---------------------------------------------------------------------------


class Reducing:
    """Pickles as a call of `function(*args)`, like a malicious weight file would."""

    def __init__(self, function: object, *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


def malicious_payloads(marker: Path) -> dict[str, tuple[Reducing, str]]:
    """Payloads and the global each is refused as (pickle protocol 2 writes Python 2 names)."""
    return {
        "os.system": (Reducing(os.system, f"touch {marker}"), "posix.system"),
        "subprocess": (
            Reducing(subprocess.check_call, ["touch", str(marker)]), "commands.check_call"
        ),
        "eval": (
            Reducing(builtins.eval, f"open({str(marker)!r}, 'w').close()"), "__builtin__.eval"
        ),
    }


@pytest.mark.parametrize("payload", ["os.system", "subprocess", "eval"])
@pytest.mark.parametrize("wrapping", ["bare", "inside-state-dict"])
def test_code_in_pickle_is_refused_and_never_runs(
    tmp_path: Path, payload: str, wrapping: str
) -> None:
    marker = tmp_path / "pwned"
    evil, refused = malicious_payloads(marker)[payload]
    obj = evil if wrapping == "bare" else {"hidden_layer.weight": evil}
    path = tmp_path / "500_model.pth"
    torch.save(obj, path)
    assert not marker.exists()

    with pytest.raises(ModelLoadError, match=f"refusing to unpickle global {re.escape(refused)}:"):
        load_classifier(str(path), "cpu")

    assert not marker.exists()


def test_unknown_module_is_not_even_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    tripwire = f"open({str(marker)!r}, 'w').close()\ndef boom(): pass\n"
    (tmp_path / "virnucpro_tripwire.py").write_text(tripwire)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = types.ModuleType("virnucpro_tripwire")  # stands in while saving, never imported

    def boom() -> None: ...

    boom.__module__, boom.__qualname__ = "virnucpro_tripwire", "boom"
    fake.boom = boom
    monkeypatch.setitem(sys.modules, "virnucpro_tripwire", fake)
    path = tmp_path / "500_model.pth"
    torch.save(Reducing(boom), path)
    monkeypatch.delitem(sys.modules, "virnucpro_tripwire")

    with pytest.raises(ModelLoadError, match=r"virnucpro_tripwire\.boom"):
        load_classifier(str(path), "cpu")

    assert not marker.exists() and "virnucpro_tripwire" not in sys.modules


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_and_legacy_files_are_refused(tmp_path: Path) -> None:
    scripted = tmp_path / "500_script.pth"
    torch.jit.save(torch.jit.script(MLPClassifier(4, 3)), str(scripted))
    legacy = tmp_path / "500_legacy.pth"
    torch.save(MLPClassifier(4, 3).state_dict(), legacy, _use_new_zipfile_serialization=False)

    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_classifier(str(scripted), "cpu")
    with pytest.raises(ModelLoadError, match="not a zip-format"):
        load_classifier(str(legacy), "cpu")


def test_wrong_layout_is_refused(tmp_path: Path, demo: Demo) -> None:
    state = load_classifier(str(demo[0]), "cpu").model.state_dict()
    bad_shape = dict(state, **{"bn1.running_var": torch.ones(HIDDEN_DIM + 1)})
    missing = {k: v for k, v in state.items() if k != "output_layer.bias"}
    for name, bad in [("shape", bad_shape), ("missing", missing)]:
        path = tmp_path / f"500_{name}.pth"
        torch.save(bad, path)
        with pytest.raises(ModelLoadError, match="running_var|output_layer.bias"):
            load_classifier(str(path), "cpu")
    path = tmp_path / "500_other.pth"
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(ModelLoadError, match="not __main__.MLPClassifier"):
        load_classifier(str(path), "cpu")


def published_module(**changes: object) -> torch.nn.Module:
    """A tiny `__main__.MLPClassifier` instance with some layers replaced or added."""
    cls = type("MLPClassifier", (torch.nn.Module,), {"__module__": "__main__"})
    model = cls()
    model.hidden_layer = torch.nn.Linear(4, 3)
    model.bn1 = torch.nn.BatchNorm1d(3)
    model.output_layer = torch.nn.Linear(3, 2)
    model.dropout = torch.nn.Dropout(0.5)
    for name, layer in changes.items():
        if layer is None:
            delattr(model, name)
        else:
            setattr(model, name, layer)
    return model


def nested_dropout() -> torch.nn.Module:
    dropout = torch.nn.Dropout()
    dropout.inner = torch.nn.Linear(3, 3)
    return dropout


@pytest.mark.parametrize("changes, refusal", [
    ({"extra": torch.nn.Linear(3, 3)}, "unexpected layer extra"),
    ({"relu": torch.nn.Dropout()}, "unexpected layer relu"),
    ({"bn1": None}, "lacks layers bn1"),
    ({"bn1": torch.nn.BatchNorm1d(3, eps=1e-3)}, "bn1 eps is 0.001"),
    ({"dropout": nested_dropout()}, "layer dropout has unexpected sublayers"),
    ({"dropout": torch.nn.Sequential(torch.nn.Dropout())}, "global torch.nn.modules.container"),
])
def test_unexpected_module_layout_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, object], refusal: str
) -> None:
    model = published_module(**changes)
    monkeypatch.setattr(sys.modules["__main__"], "MLPClassifier", type(model), raising=False)
    path = tmp_path / "500_model.pth"
    torch.save(model, path)

    with pytest.raises(ModelLoadError, match=refusal):
        load_classifier(path, "cpu")


def test_score_shapes(demo: Demo) -> None:
    classifier = load_classifier(demo[1], "cpu")
    assert classifier.score(torch.zeros(0, INPUT_DIM)).shape == (0, 2)
    probabilities = classifier.score(features().double())
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(10))
    with pytest.raises(ValueError, match=f"expects features \\[n, {INPUT_DIM}\\]"):
        classifier.score(torch.zeros(2, INPUT_DIM + 1))


# --- chunk length ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("300_model.pth", 300), ("500_model.pth", 500), ("classifier_500.pth", 500),
    ("model300.safetensors", 300), ("model.pth", None), ("3000_model.pth", None),
    ("1500_model.pth", None), ("300_500.pth", None),
])
def test_chunk_length_from_name(name: str, expected: int | None) -> None:
    assert chunk_length_from_name(f"/models/500/{name}") == expected


def test_safetensors_metadata_wins_over_name(tmp_path: Path, demo: Demo) -> None:
    model = load_classifier(str(demo[0]), "cpu").model
    path = tmp_path / "500_model.safetensors"
    save_safetensors(model, str(path), 300)

    assert load_classifier(str(path), "cpu").chunk_length == 300


def fake_classifier(chunk_length: int | None) -> Classifier:
    return Classifier(model=MLPClassifier(4, 3).eval(), chunk_length=chunk_length, path="x.pth")


def test_check_chunk_length() -> None:
    assert check_chunk_length(fake_classifier(500), None, force=False) == 500
    assert check_chunk_length(fake_classifier(500), 500, force=False) == 500
    assert check_chunk_length(fake_classifier(None), 300, force=False) == 300
    assert check_chunk_length(fake_classifier(500), 300, force=True) == 300
    with pytest.raises(ChunkLengthMismatch) as mismatch:
        check_chunk_length(fake_classifier(500), 300, force=False)
    message = str(mismatch.value)
    assert "300" in message and "500" in message and "--force-chunk-length" in message
    with pytest.raises(ChunkLengthUnknown, match="--chunk-length"):
        check_chunk_length(fake_classifier(None), None, force=False)
    with pytest.raises(ValueError, match="positive"):
        check_chunk_length(fake_classifier(500), 0, force=True)


# --- conversion ------------------------------------------------------------------------------


def test_convert_round_trip_gives_identical_scores(tmp_path: Path, demo: Demo) -> None:
    out = tmp_path / "converted.safetensors"

    assert convert_classifier(str(demo[0]), str(out)) == 500
    assert out.stat().st_mode & 0o777 == 0o644  # readable by the image's user, like the .pth

    with safetensors.safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata == {"format": "virnucpro-mlp", "chunk_length": "500",
                        "input_dim": str(INPUT_DIM), "hidden_dim": str(HIDDEN_DIM)}
    converted = load_classifier(str(out), "cpu")
    assert converted.chunk_length == 500
    for original in demo:
        expected = load_classifier(original, "cpu").score(features())
        assert torch.equal(converted.score(features()), expected)


def test_convert_refuses_unknown_or_contradicting_chunk_length(tmp_path: Path, demo: Demo) -> None:
    unnamed = tmp_path / "model.pth"
    unnamed.write_bytes(demo[0].read_bytes())
    out = tmp_path / "out.safetensors"

    with pytest.raises(ChunkLengthUnknown):
        convert_classifier(str(unnamed), str(out))
    with pytest.raises(ChunkLengthMismatch):
        convert_classifier(str(demo[0]), str(out), 300)
    assert not out.exists()
    assert convert_classifier(str(unnamed), str(out), 300) == 300
    assert load_classifier(str(out), "cpu").chunk_length == 300
