import os
import random
import subprocess
import sys
import warnings

import esm
import pytest
import torch

from core.errors import ModelLoadError
from core.esm2 import ESM2, ESM2Encoder, load_esm2, read_checkpoint, write_demo_checkpoint
from oracles import pack

LAYERS = 2
CPU = torch.device("cpu")
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
PROTEINS = [
    "MKTAYIAKQRQISFVKSHFSRQ",
    AMINO_ACIDS * 3,
    "M",
    "MKV<mask>LLAGW<mask>PQ",
    "WWHHKKRRDDEE",
    "".join(random.Random(0).choices(AMINO_ACIDS, k=151)),
]


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("esm") / "esm2_demo.pt"
    write_demo_checkpoint(path, num_layers=LAYERS, embed_dim=64, heads=4, seed=0)
    return path


@pytest.fixture(scope="module")
def encoder(demo_path):
    return load_esm2(str(demo_path), CPU)


@pytest.fixture(scope="module")
def fair_esm_model(demo_path):
    """fair-esm's own ESM2, built by fair-esm's loader from the same (safely read) file."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        model, _ = esm.pretrained.load_model_and_alphabet_core("esm2_demo", read_checkpoint(demo_path))
    return model.eval()


def fair_esm_forward(model, token_lists):
    """Padded batch through fair-esm, with the published pooling t[i, 1 : min(1024, L) + 1].mean(0)."""
    tokens = torch.full((len(token_lists), max(map(len, token_lists))), model.padding_idx)
    for i, ids in enumerate(token_lists):
        tokens[i, : len(ids)] = torch.as_tensor(ids)
    with torch.no_grad():
        result = model(tokens, repr_layers=[LAYERS])
    hidden = result["representations"][LAYERS]
    pooled = torch.stack([hidden[i, 1 : min(1024, len(ids) - 2) + 1].mean(0) for i, ids in enumerate(token_lists)])
    return pooled, result["logits"]


def assert_close_per_row(actual, expected, tolerance):
    errors = (actual - expected).norm(dim=1) / expected.norm(dim=1)
    assert errors.max().item() <= tolerance, errors


def test_parameter_names_are_fair_esms():
    ours = ESM2(num_layers=2, embed_dim=32, attention_heads=4, vocab_size=33, mask_idx=32)
    theirs = esm.model.esm2.ESM2(num_layers=2, embed_dim=32, attention_heads=4)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_demo_checkpoint_has_the_published_layout(demo_path):
    data = read_checkpoint(demo_path)
    assert set(data) == {"model", "cfg"}
    assert all(k.startswith(("encoder.sentence_encoder.", "encoder.lm_head.")) for k in data["model"])
    assert "encoder.sentence_encoder.layers.1.self_attn.rot_emb.inv_freq" in data["model"]
    assert not any("contact_head" in k for k in data["model"])
    config = data["cfg"]["model"]
    assert (config.encoder_layers, config.encoder_embed_dim, config.encoder_attention_heads) == (LAYERS, 64, 4)
    assert config.token_dropout is True
    for norm in ("layers.0.self_attn_layer_norm", "layers.1.final_layer_norm", "emb_layer_norm_after"):
        weight = data["model"][f"encoder.sentence_encoder.{norm}.weight"]
        assert not torch.allclose(weight, torch.ones_like(weight))


def test_embeddings_match_fair_esm(encoder, fair_esm_model):
    token_lists = [encoder.tokenize(p) for p in PROTEINS]
    assert encoder.alphabet.mask_idx in token_lists[3]
    expected, _ = fair_esm_forward(fair_esm_model, token_lists)
    actual = encoder.embed(PROTEINS)
    assert actual.shape == (len(PROTEINS), encoder.dim) == (len(PROTEINS), 64)
    assert actual.dtype == torch.float32 and actual.device.type == "cpu"
    assert_close_per_row(actual, expected, 1e-5)


def test_mask_tokens_change_the_embedding(encoder):
    masked, unmasked = encoder.embed(["MKV<mask>LLAGW<mask>PQ", "MKVALLAGWAPQ"])
    assert not torch.allclose(masked, unmasked, atol=1e-3)


def test_logits_match_fair_esm(encoder, fair_esm_model):
    token_lists = [encoder.tokenize(p) for p in PROTEINS[:2]]
    _, expected = fair_esm_forward(fair_esm_model, token_lists)
    (batch,) = pack(token_lists, budget_tokens=1000)
    with torch.no_grad():
        logits = encoder.model.lm_head(encoder.model(batch))
    for row, i in enumerate(batch.order):
        start, end = batch.cu_seqlens[row].item(), batch.cu_seqlens[row + 1].item()
        torch.testing.assert_close(logits[start:end], expected[i, : end - start], rtol=1e-5, atol=1e-5)


def test_pooling_stops_after_1024_residues_but_model_sees_all(encoder, fair_esm_model):
    long_protein = "".join(random.Random(1).choices(AMINO_ACIDS, k=1030))
    proteins = [long_protein, PROTEINS[0]]
    token_lists = [encoder.tokenize(p) for p in proteins]
    expected, _ = fair_esm_forward(fair_esm_model, token_lists)
    actual = encoder.embed(proteins)
    assert_close_per_row(actual, expected, 1e-5)
    with torch.no_grad():
        (batch,) = pack(token_lists[:1], budget_tokens=2000)
        mean_of_all_residues = encoder.model(batch)[1:-1].mean(0)
    assert not torch.allclose(actual[0], mean_of_all_residues, atol=1e-4)


def test_packing_budget_and_input_order_do_not_change_embeddings(encoder):
    baseline = ESM2Encoder(encoder.model, encoder.alphabet, CPU, batch_tokens=100_000).embed(PROTEINS)
    shuffled = list(range(len(PROTEINS)))
    random.Random(2).shuffle(shuffled)
    for budget in (1, 40, 160, 4096):
        packed = ESM2Encoder(encoder.model, encoder.alphabet, CPU, batch_tokens=budget)
        torch.testing.assert_close(packed.embed(PROTEINS), baseline, rtol=1e-6, atol=1e-6)
        reordered = packed.embed([PROTEINS[i] for i in shuffled])
        torch.testing.assert_close(reordered, baseline[shuffled], rtol=1e-6, atol=1e-6)


def test_embed_edge_cases(encoder):
    assert encoder.embed([]).shape == (0, encoder.dim)
    with pytest.raises(ValueError, match="empty"):
        encoder.embed([""])
    with pytest.raises(ValueError, match="'J'"):
        encoder.embed(["MKJ"])


def test_a_model_name_is_for_the_job_to_fetch(tmp_path, monkeypatch):
    """core reads local files only: fetching a fair-esm model by name is job/models.py's."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    write_demo_checkpoint(tmp_path / "checkpoints" / "esm2_t2_1M_UR50D.pt", num_layers=LAYERS)
    with pytest.raises(ModelLoadError, match="no such file.*s3:// URI or the model's name"):
        load_esm2("esm2_t2_1M_UR50D", CPU)


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_esm2(str(tmp_path / "missing.pt"), CPU)


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_checkpoint_needing_other_globals_is_refused_without_running_them(tmp_path, demo_path):
    marker = tmp_path / "marker"
    data = read_checkpoint(demo_path)
    data["cfg"]["payload"] = RunsCommand(f"touch {marker}")
    torch.save(data, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="system"):
        load_esm2(str(tmp_path / "evil.pt"), CPU)
    assert not marker.exists()


def test_unreadable_or_wrong_files_are_clear_errors(tmp_path, demo_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="not a readable"):
        load_esm2(str(tmp_path / "garbage.pt"), CPU)

    torch.save({"model": {}}, tmp_path / "no_cfg.pt")
    with pytest.raises(ModelLoadError, match="not a fair-esm ESM-2 checkpoint"):
        load_esm2(str(tmp_path / "no_cfg.pt"), CPU)

    data = read_checkpoint(demo_path)
    del data["model"]["encoder.sentence_encoder.layers.1.fc2.bias"]
    torch.save(data, tmp_path / "missing_key.pt")
    with pytest.raises(ModelLoadError, match="layers.1.fc2.bias"):
        load_esm2(str(tmp_path / "missing_key.pt"), CPU)

    data = read_checkpoint(demo_path)
    data["cfg"]["model"].encoder_embed_dim = 32
    torch.save(data, tmp_path / "wrong_size.pt")
    with pytest.raises(ModelLoadError, match="do not match"):
        load_esm2(str(tmp_path / "wrong_size.pt"), CPU)


def test_loading_the_weights_imports_no_more_of_the_compiler(demo_path, tmp_path):
    """core.pipeline loads ESM-2's weights in one thread while the other imports the
    compiler: two threads importing one package can trip Python's import-deadlock check.
    Once torch._dynamo is imported (the other thread does it first), the weights' half of
    the load (from the checkpoint, then from the converted-weights cache) must import no
    module of dynamo or inductor (the attention backends do, in the encoder's half)."""
    code = (
        "import sys, torch, torch._dynamo\n"
        "from pathlib import Path\n"
        "from core.esm2 import load_esm2_model\n"
        "from job.model_cache import WeightsCache\n"
        "compiler = lambda: {m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))}\n"
        "before = compiler()\n"
        f"cache = WeightsCache(Path({str(tmp_path / 'cache')!r}), 'a' * 64)\n"
        "for _ in range(2):\n"
        f"    print(load_esm2_model({str(demo_path)!r}, torch.device('cpu'), cache)[1])\n"
        "print(sorted(compiler() - before))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[:2] == ["source (cached now)", "cache"], lines
    assert lines[2] == "[]", lines[2]
