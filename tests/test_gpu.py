"""GPU engine on the FULL-SIZE architectures with random weights (skipped without CUDA).

Packed fp16 embeddings against an fp32 reference on padded or one-at-a-time batches:
ESM-2 3B against fair-esm itself (fp32, padded, published pooling), DNABERT-S (12 x 768)
against the published loop over our model in fp32 (one sequence per call). Every attention backend available on the device, compiled
and eager, must give a per-frame cosine >= 0.9999 and no NaN; the worst relative error is
printed (run with -s to see the summary).
"""
from __future__ import annotations

import argparse
import gc
import random

import pytest
import torch
import torch.nn.functional as F

from core import attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
MIN_COSINE = 0.9999
SUMMARY: list[str] = []


def compare(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "NaN/Inf in the packed fp16 embeddings"
    cosine = F.cosine_similarity(actual, expected, dim=1)
    relative = (actual - expected).norm(dim=1) / expected.norm(dim=1)
    return cosine.min().item(), relative.max().item()


def backends(alibi: bool) -> list[str]:
    names = ["flash_attn", "flex" if alibi else "varlen", "sdpa_padded"]
    return [n for n in names if attention.importable(n)]


@pytest.fixture(scope="module", autouse=True)
def fp32_is_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    print("\nGPU engine summary:\n" + "\n".join(SUMMARY))


@pytest.fixture(scope="module")
def esm_setup():
    esm = pytest.importorskip("esm")
    from benchmarks.bench import fair_esm_published
    from core.esm2 import ESM2Encoder, model_from_checkpoint

    torch.manual_seed(0)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device(CUDA):
        fair = esm.model.esm2.ESM2(num_layers=36, embed_dim=2560, attention_heads=40, alphabet=alphabet).eval()
    rng = random.Random(0)
    proteins = ["".join(rng.choices(AMINO_ACIDS, k=n)) for n in [1, 2, 7, 30, 64, 100, 128, 150] + [166] * 24 + [300, 700]]
    proteins += ["".join(rng.choices(AMINO_ACIDS, k=1100)), "MKV<mask>LLAGW<mask>PQ" * 3]
    config = argparse.Namespace(encoder_layers=36, encoder_embed_dim=2560, encoder_attention_heads=40,
                                token_dropout=True)
    model = model_from_checkpoint({"model": fair.state_dict(), "cfg": {"model": config}}, "fair-esm", CUDA,
                                  torch.float16)
    probe = ESM2Encoder(model, alphabet, CUDA, None, attention="sdpa_padded", compile=False)
    flat, lengths = probe.tokenize_many(proteins)
    token_lists = [t.tolist() for t in torch.from_numpy(flat).split(lengths.tolist())]
    expected = fair_esm_published(fair, token_lists, CUDA, 36)
    assert torch.isfinite(expected).all(), "the fp32 reference itself overflowed"
    del fair
    gc.collect()
    torch.cuda.empty_cache()
    yield model, alphabet, proteins, expected
    del model
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("compiled", [True, False])
def test_esm2_3b_packed_fp16_matches_fair_esm_fp32(esm_setup, compiled):
    from core.esm2 import ESM2Encoder

    model, alphabet, proteins, expected = esm_setup
    for name in backends(alibi=False):
        encoder = ESM2Encoder(model, alphabet, CUDA, 4096, attention=name, compile=compiled)
        actual = encoder.embed(proteins)
        cosine, relative = compare(actual, expected)
        SUMMARY.append(f"ESM-2 3B  {encoder.backend:<32} min cosine {cosine:.7f}  max rel err {relative:.2e}  "
                       f"({len(proteins)} proteins, 1..1100 aa)")
        assert cosine >= MIN_COSINE, (name, compiled, cosine)


def test_esm2_selected_backend_and_budget_from_free_memory(esm_setup):
    from core.esm2 import ESM2Encoder

    model, alphabet, proteins, expected = esm_setup
    encoder = ESM2Encoder(model, alphabet, CUDA, None)
    assert encoder.attention.name in ("flash_attn", "varlen", "sdpa_padded")
    assert 1024 <= encoder.batch_tokens <= 65536
    reversed_once = encoder.embed(proteins[::-1])
    assert torch.equal(encoder.embed(proteins[::-1]), reversed_once), "the same input must give the same bits"
    cosine, relative = compare(reversed_once, expected.flip(0))
    SUMMARY.append(f"ESM-2 3B  selected: {encoder.backend}, batch_tokens {encoder.batch_tokens}, reversed input: "
                   f"min cosine {cosine:.7f}, max rel err {relative:.2e}; skipped: {encoder.attention.note or '-'}")
    assert cosine >= MIN_COSINE


@pytest.fixture(scope="module")
def dna_setup():
    from benchmarks.bench import bpe_tokenizer, dna_published_single, dnabert_model
    from core.dnabert import DNABERTConfig

    tokenizer, vocab = bpe_tokenizer(4096, 600)
    config = DNABERTConfig(vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072)
    model = dnabert_model(config, CUDA, torch.float16)
    reference = dnabert_model(config, CUDA, torch.float32)  # the same weights
    rng = random.Random(1)
    reads = ["".join(rng.choices("ACGT", k=n)) for n in [1, 7, 60, 150, 299, 300, 3000] + [499] * 40 + [498] * 20]
    flat, lengths = tokenizer.encode_many(reads)
    token_lists = [t.tolist() for t in torch.from_numpy(flat).split(lengths.tolist())]
    expected = dna_published_single(reference, token_lists, CUDA)
    del reference
    yield model, tokenizer, reads, expected


@pytest.mark.parametrize("compiled", [True, False])
def test_dnabert_s_packed_fp16_matches_fp32_reference(dna_setup, compiled):
    from core.dnabert import DNABERTEncoder

    model, tokenizer, reads, expected = dna_setup
    for name in backends(alibi=True):
        encoder = DNABERTEncoder(model, tokenizer, CUDA, 8192, attention=name, compile=compiled)
        actual = encoder.embed(reads)
        cosine, relative = compare(actual, expected)
        SUMMARY.append(f"DNABERT-S {encoder.backend:<32} min cosine {cosine:.7f}  max rel err {relative:.2e}  "
                       f"({len(reads)} reads, 1..3000 nt)")
        assert cosine >= MIN_COSINE, (name, compiled, cosine)


def test_dnabert_selected_backend(dna_setup):
    from core.dnabert import DNABERTEncoder

    model, tokenizer, reads, expected = dna_setup
    encoder = DNABERTEncoder(model, tokenizer, CUDA, None)
    assert encoder.attention.name in ("flash_attn", "flex", "sdpa_padded")
    once = encoder.embed(reads)
    assert torch.equal(encoder.embed(reads), once), "the same input must give the same bits"
    cosine, relative = compare(once, expected)
    SUMMARY.append(f"DNABERT-S selected: {encoder.backend}, batch_tokens {encoder.batch_tokens}: min cosine "
                   f"{cosine:.7f}, max rel err {relative:.2e}; skipped: {encoder.attention.note or '-'}")
    assert cosine >= MIN_COSINE


def test_segment_mean_gives_the_same_bits_every_time():
    from core.packing import segment_mean

    generator = torch.Generator(device=CUDA).manual_seed(0)
    lengths = torch.randint(3, 400, (600,), generator=generator, device=CUDA)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=CUDA)
    cu_seqlens[1:] = lengths.cumsum(0)
    hidden = torch.randn(int(cu_seqlens[-1]), 2560, generator=generator, device=CUDA, dtype=torch.float16)
    first = segment_mean(hidden, cu_seqlens, 1, 1, 1024)
    for _ in range(20):  # atomics would reorder the float32 sums, and change the last bits
        assert torch.equal(segment_mean(hidden, cu_seqlens, 1, 1, 1024), first)
    expected = torch.stack([hidden[int(a) + 1:int(b) - 1].float().mean(0) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])])
    assert torch.allclose(first, expected, rtol=1e-5, atol=1e-6)
