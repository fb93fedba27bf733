"""DNABERT-S encoder: matches a naive dense reference, packs without changing results, loads
the published checkpoint layout, tokenizes with [CLS]/[SEP] and no truncation, fails plainly."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from core.dnabert import alibi_slopes, load_dnabert, write_demo_model
from core.errors import ModelLoadError

CPU = torch.device("cpu")

# The demo model has 6 heads, a count that is not a power of two, as DNABERT-S's 12 is not.
DEMO = {"layers": 2, "hidden": 48, "heads": 6, "intermediate": 96}

# Parameter names of the published zhihan1996/DNABERT-S pytorch_model.bin: the state dict of
# DNABERT-2's `bert_layers.BertModel` (saved with save_pretrained, so no `bert.` prefix),
# pooler included; `encoder.alibi` is a plain attribute and `embeddings.token_type_ids` a
# non-persistent buffer, so neither is in the file.
PUBLISHED_TOP_KEYS = [
    "embeddings.word_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
    "pooler.dense.weight",
    "pooler.dense.bias",
]
PUBLISHED_LAYER_KEYS = [
    "attention.self.Wqkv.weight",
    "attention.self.Wqkv.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "mlp.gated_layers.weight",
    "mlp.wo.weight",
    "mlp.wo.bias",
    "mlp.layernorm.weight",
    "mlp.layernorm.bias",
]


def published_keys(layers: int) -> list[str]:
    return PUBLISHED_TOP_KEYS + [
        f"encoder.layer.{i}.{name}" for i in range(layers) for name in PUBLISHED_LAYER_KEYS
    ]


def published_shape(key: str, config: dict) -> tuple[int, ...]:
    h, inter = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "word_embeddings.weight": (config["vocab_size"], h),
        "token_type_embeddings.weight": (config["type_vocab_size"], h),
        "Wqkv.weight": (3 * h, h),
        "Wqkv.bias": (3 * h,),
        "gated_layers.weight": (2 * inter, h),
        "wo.weight": (h, inter),
        "dense.weight": (h, h),
    }
    for suffix, shape in shapes.items():
        if key.endswith(suffix):
            return shape
    return (h,)


def random_dna(rng: random.Random, length: int) -> str:
    return "".join(rng.choice("ACGT") for _ in range(length))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("dnabert") / "model", **DEMO)


@pytest.fixture(scope="module")
def encoder(demo_dir: Path):
    return load_dnabert(str(demo_dir), CPU)


@pytest.fixture(scope="module")
def sequences() -> list[str]:
    rng = random.Random(7)
    return [random_dna(rng, n) for n in (1, 7, 60, 150, 301, 499, 500, 33)] + [""]


# ---- independent naive reference: dense, one sequence, explicit bias matrix, float64 ----

def naive_slopes(heads: int) -> torch.Tensor:
    low = 2 ** int(math.floor(math.log2(heads)))
    slopes = [2.0 ** (-8.0 * (i + 1) / low) for i in range(low)]
    slopes += [2.0 ** (-4.0 * (2 * i + 1) / low) for i in range(heads - low)]
    return torch.tensor(slopes, dtype=torch.float64)


def naive_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def naive_embedding(weights: dict, config: dict, ids: list[int]) -> torch.Tensor:
    w = {k: v.double() for k, v in weights.items()}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    inter, d = config["intermediate_size"], hidden // heads
    n = len(ids)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ w[f"{name}.weight"].T
        return out + w[f"{name}.bias"] if f"{name}.bias" in w else out

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        eps = config["layer_norm_eps"]
        return naive_layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], eps)

    token_type_zero = w["embeddings.token_type_embeddings.weight"][0]
    x = norm(w["embeddings.word_embeddings.weight"][ids] + token_type_zero, "embeddings.LayerNorm")
    pos = torch.arange(n, dtype=torch.float64)
    bias = -naive_slopes(heads)[:, None, None] * (pos[:, None] - pos[None, :]).abs()[None]
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        qkv = linear(x, p + "attention.self.Wqkv")
        q, k, v = (qkv[:, i * hidden:(i + 1) * hidden].reshape(n, heads, d).permute(1, 0, 2)
                   for i in range(3))
        scores = q @ k.transpose(1, 2) / math.sqrt(d) + bias
        probs = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        context = (probs @ v).permute(1, 0, 2).reshape(n, hidden)
        attended = linear(context, p + "attention.output.dense")
        x = norm(attended + x, p + "attention.output.LayerNorm")
        up = linear(x, p + "mlp.gated_layers")
        gate, multiplier = up[:, :inter], up[:, inter:]
        gelu = 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0)))
        x = norm(linear(gelu * multiplier, p + "mlp.wo") + x, p + "mlp.layernorm")
    return x.mean(dim=0)


def relative_errors(actual: torch.Tensor, expected: torch.Tensor) -> list[float]:
    return [float((a.double() - e.double()).norm() / e.double().norm())
            for a, e in zip(actual, expected)]


# ---- tests ----

def test_alibi_slopes_for_twelve_heads_follow_dnabert2():
    expected = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -k for k in (0.5, 1.5, 2.5, 3.5)]
    assert alibi_slopes(12) == pytest.approx(expected, rel=1e-15)
    assert alibi_slopes(8) == pytest.approx([2.0 ** -k for k in range(1, 9)], rel=1e-15)


def test_encoder_matches_naive_dense_reference(demo_dir, encoder, sequences):
    config = json.loads((demo_dir / "config.json").read_text())
    weights = torch.load(demo_dir / "pytorch_model.bin", weights_only=True)
    tokenizer = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    expected = torch.stack([naive_embedding(weights, config, tokenizer.encode(s).ids)
                            for s in sequences])
    actual = encoder.embed(sequences)
    assert actual.dtype == torch.float32 and actual.device.type == "cpu"
    assert actual.shape == (len(sequences), encoder.dim) == (len(sequences), DEMO["hidden"])
    assert max(relative_errors(actual, expected)) <= 1e-5


@pytest.fixture(scope="module")
def one_at_a_time(encoder, sequences) -> torch.Tensor:
    return torch.cat([encoder.embed([s]) for s in sequences])


@pytest.mark.parametrize("budget", [1, 64, 300, 100_000])
def test_packed_batches_equal_one_at_a_time(demo_dir, sequences, one_at_a_time, budget):
    alone = one_at_a_time
    packed_encoder = load_dnabert(str(demo_dir), CPU, batch_tokens=budget)
    orders = [list(range(len(sequences))), list(reversed(range(len(sequences))))]
    orders.append(random.Random(budget).sample(range(len(sequences)), len(sequences)))
    for order in orders:
        packed = packed_encoder.embed([sequences[i] for i in order])
        assert max(relative_errors(packed, alone[order])) <= 1e-5


def test_embed_of_nothing_is_empty(encoder):
    assert encoder.embed([]).shape == (0, encoder.dim)


def test_tokenizer_adds_cls_and_sep_and_never_truncates(demo_dir, encoder):
    raw = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    long_read = random_dna(random.Random(3), 3000)
    ids = encoder.tokenizer.encode(long_read)
    assert ids[0] == cls_id and ids[-1] == sep_id
    assert ids[1:-1] == raw.encode(long_read, add_special_tokens=False).ids
    assert len(ids) > 512
    assert "".join(raw.id_to_token(i) for i in ids[1:-1]) == long_read
    assert torch.isfinite(encoder.embed([long_read])).all()


def test_special_token_ids_are_dnabert2s(demo_dir):
    raw = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    ids = [raw.token_to_id(t) for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")]
    assert ids == [0, 1, 2, 3, 4]


def test_tokenizer_without_post_processor_still_gets_cls_and_sep(demo_dir, tmp_path, encoder):
    model_dir = tmp_path / "model"
    shutil.copytree(demo_dir, model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    plain = load_dnabert(str(model_dir), CPU)
    read = "ACGTTGCAAGGCTTAC"
    assert plain.tokenizer.encode(read) == encoder.tokenizer.encode(read)


def test_demo_model_is_written_with_published_names_and_config_fields(demo_dir):
    weights = torch.load(demo_dir / "pytorch_model.bin", weights_only=True)
    assert sorted(weights) == sorted(published_keys(DEMO["layers"]))
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
    assert config["auto_map"]["AutoModel"] == "bert_layers.BertModel"


def write_checkpoint(demo_dir: Path, target: Path, state_dict: dict) -> Path:
    target.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(demo_dir / name, target / name)
    torch.save(state_dict, target / "pytorch_model.bin")
    return target


def published_state_dict(config: dict, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(published_shape(key, config), generator=generator)
            for key in published_keys(config["num_hidden_layers"])}


def test_published_key_list_loads_with_nothing_missing(demo_dir, tmp_path):
    config = json.loads((demo_dir / "config.json").read_text())
    model_dir = write_checkpoint(demo_dir, tmp_path / "published", published_state_dict(config))
    loaded = load_dnabert(str(model_dir), CPU)
    assert loaded.embed(["ACGTACGT"]).shape == (1, config["hidden_size"])


def test_bert_prefixed_masked_lm_checkpoint_loads(demo_dir, tmp_path, encoder):
    config = json.loads((demo_dir / "config.json").read_text())
    weights = torch.load(demo_dir / "pytorch_model.bin", weights_only=True)
    h = config["hidden_size"]
    state = {f"bert.{k}": v for k, v in weights.items() if not k.startswith("pooler.")}
    state["cls.predictions.transform.dense.weight"] = torch.zeros(h, h)
    state["cls.predictions.decoder.weight"] = torch.zeros(config["vocab_size"], h)
    model_dir = write_checkpoint(demo_dir, tmp_path / "mlm", state)
    reads = ["ACGTTTGCA", "GGGCCCATATAT"]
    assert torch.equal(load_dnabert(str(model_dir), CPU).embed(reads), encoder.embed(reads))


def test_wrong_key_is_reported_by_name(demo_dir, tmp_path):
    config = json.loads((demo_dir / "config.json").read_text())
    state = published_state_dict(config)
    state["encoder.layer.1.mlp.w_o.weight"] = state.pop("encoder.layer.1.mlp.wo.weight")
    model_dir = write_checkpoint(demo_dir, tmp_path / "wrong", state)
    with pytest.raises(ModelLoadError) as error:
        load_dnabert(str(model_dir), CPU)
    assert "missing encoder.layer.1.mlp.wo.weight" in str(error.value)
    assert "unexpected encoder.layer.1.mlp.w_o.weight" in str(error.value)


def test_shape_that_contradicts_config_is_reported(demo_dir, tmp_path):
    config = json.loads((demo_dir / "config.json").read_text())
    state = published_state_dict(config)
    state["encoder.layer.0.mlp.wo.bias"] = torch.zeros(config["hidden_size"] + 1)
    model_dir = write_checkpoint(demo_dir, tmp_path / "misshapen", state)
    with pytest.raises(ModelLoadError, match="encoder.layer.0.mlp.wo.bias"):
        load_dnabert(str(model_dir), CPU)


def test_safetensors_weights_are_preferred_and_equivalent(tmp_path, demo_dir, encoder):
    st_dir = write_demo_model(tmp_path / "st", safetensors=True, **DEMO)
    assert (st_dir / "model.safetensors").exists() and not (st_dir / "pytorch_model.bin").exists()
    reads = ["ACGTTTGCA", "GGGCCCATATAT"]
    assert torch.equal(load_dnabert(str(st_dir), CPU).embed(reads), encoder.embed(reads))


def test_missing_config_field_and_missing_file_are_reported(demo_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(demo_dir, model_dir)
    (model_dir / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="pytorch_model.bin"):
        load_dnabert(str(model_dir), CPU)
    config = json.loads((demo_dir / "config.json").read_text())
    del config["num_attention_heads"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="num_attention_heads"):
        load_dnabert(str(model_dir), CPU)


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_dnabert(str(tmp_path / "absent"), CPU)


def test_uncached_hub_id_fails_fast_with_advice(monkeypatch, tmp_path):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        load_dnabert("zhihan1996/DNABERT-S", CPU)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "zhihan1996/DNABERT-S" in message and "download" in message


def test_hub_id_without_huggingface_hub_fails_with_advice(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelLoadError, match="zhihan1996/DNABERT-S.*download"):
        load_dnabert("zhihan1996/DNABERT-S", CPU)
