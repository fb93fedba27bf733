"""The GPU engine's code paths on the CPU (CI): every attention backend that runs here agrees
with the reference path on tiny models, packing order and budget do not change embeddings,
the fast tokenizers and packer match the plain ones, NaN fails loudly, and the pipelined
Predictor gives the same results as the sequential one."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from core import attention
from core.attention import Segments
from core.dnabert import DNABERTEncoder, load_dnabert, write_demo_model
from core.errors import NonFiniteEmbedding
from core.esm2 import ESM2Encoder, load_esm2, write_demo_checkpoint
from core.packing import pack_flat
from oracles import pack

CPU = torch.device("cpu")
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def relative_errors(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return (actual.double() - expected.double()).norm(dim=1) / expected.double().norm(dim=1)


@pytest.fixture(scope="module")
def esm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("esm") / "esm2_demo.pt"
    write_demo_checkpoint(path, num_layers=2, embed_dim=64, heads=4, seed=3)
    return path


@pytest.fixture(scope="module")
def dna_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("dna") / "model", layers=2, hidden=48, heads=6, intermediate=96)


@pytest.fixture(scope="module")
def proteins():
    rng = random.Random(5)
    return ["".join(rng.choices(AMINO_ACIDS, k=rng.randint(1, 250))) for _ in range(30)] + ["MKV<mask>LLAGW<mask>PQ"]


@pytest.fixture(scope="module")
def dna_reads():
    rng = random.Random(6)
    return ["".join(rng.choices("ACGT", k=rng.randint(0, 520))) for _ in range(30)]


def segments_for(lengths, total=None):
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return Segments(torch.tensor(bounds, dtype=torch.int32), bounds, max(lengths), total or bounds[-1])


@pytest.mark.parametrize("alibi", [False, True])
def test_backends_agree_with_per_sequence_attention(alibi):
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 130, 64, 17]
    real = sum(lengths)
    slopes = torch.tensor([0.5, 0.25, 0.125]) if alibi else None
    names = ["sdpa_padded", "flex"] if alibi else ["sdpa_padded"]
    for name in names:
        backend = attention.make(name, alibi, device=CPU)
        total = backend.pads_to(real)
        q, k, v = (torch.randn(total, 3, 16, generator=generator) for _ in range(3))
        expected = attention.per_sequence(q[:real], k[:real], v[:real], segments_for(lengths), 0.3, slopes)
        args = (q, k, v) if not backend.heads_first else tuple(t.transpose(0, 1).contiguous() for t in (q, k, v))
        out = backend(*args, segments_for(lengths, total), 0.3, slopes)
        if backend.heads_first:
            out = out.transpose(0, 1)
        torch.testing.assert_close(out[:real], expected, rtol=1e-5, atol=1e-5)
        assert total % attention.FLEX_BLOCK == 0 or name != "flex"


def test_select_on_cpu_is_the_reference_and_bad_names_are_refused():
    assert attention.select(False, CPU, torch.float32).name == "per_sequence"
    with pytest.raises(ValueError, match="ALiBi"):
        attention.make("varlen", alibi=True)
    with pytest.raises(ValueError, match="unknown"):
        attention.make("nope", alibi=False)


@pytest.mark.parametrize("backend", ["per_sequence", "sdpa_padded"])
def test_esm_engine_matches_reference_path(esm_path, proteins, backend):
    reference = load_esm2(str(esm_path), CPU)
    expected = reference.embed(proteins)
    model = load_esm2(str(esm_path), CPU).model
    engine = ESM2Encoder(model, reference.alphabet, CPU, 300, attention=backend, compile=False)
    assert engine.backend == f"float32 {backend} eager"
    assert relative_errors(engine.embed(proteins), expected).max() <= 1e-5


def test_esm_engine_packing_budget_and_order_do_not_change_embeddings(esm_path, proteins):
    model = load_esm2(str(esm_path), CPU).model
    alphabet = load_esm2(str(esm_path), CPU).alphabet
    baseline = ESM2Encoder(model, alphabet, CPU, 100_000, attention="sdpa_padded", compile=False).embed(proteins)
    order = random.Random(1).sample(range(len(proteins)), len(proteins))
    for budget in (1, 200, 1000):
        encoder = ESM2Encoder(model, alphabet, CPU, budget, attention="sdpa_padded", compile=False)
        shuffled = encoder.embed([proteins[i] for i in order])
        assert relative_errors(shuffled, baseline[order]).max() <= 1e-5


def test_esm_fast_tokenizer_matches_fair_esm(esm_path, proteins):
    encoder = load_esm2(str(esm_path), CPU)
    for subset in (proteins, proteins[:-1], ["M"], []):  # with and without '<mask>'
        flat, lengths = encoder.tokenize_many(subset)
        assert flat.tolist() == [t for p in subset for t in encoder.tokenize(p)]
        assert lengths.tolist() == [len(encoder.tokenize(p)) for p in subset]
    with pytest.raises(ValueError, match="'J'"):
        encoder.tokenize_many(["MKJ", "MK"])
    with pytest.raises(ValueError, match="empty"):
        encoder.tokenize_many(["MK", ""])


@pytest.mark.parametrize("backend", ["per_sequence", "sdpa_padded", "flex"])
def test_dnabert_engine_matches_reference_path(dna_dir, dna_reads, backend):
    reference = load_dnabert(str(dna_dir), CPU)
    expected = reference.embed(dna_reads)
    fresh = load_dnabert(str(dna_dir), CPU)
    engine = DNABERTEncoder(fresh.model, fresh.tokenizer, CPU, 400, attention=backend, compile=False)
    assert relative_errors(engine.embed(dna_reads), expected).max() <= 1e-5


def test_dnabert_warm_up_meets_every_flex_bucket_a_batch_can_pad_to(dna_dir, dna_reads, monkeypatch):
    fresh = load_dnabert(str(dna_dir), CPU)
    encoder = DNABERTEncoder(fresh.model, fresh.tokenizer, CPU, 1000, attention="flex", compile=False)
    padded = []
    monkeypatch.setattr(encoder, "_pooled", lambda batch: padded.append(encoder.attention.pads_to(batch.total))
                        or torch.zeros(len(batch.order), encoder.dim))
    encoder.warm_up()
    assert padded == [], "an eager engine has nothing to compile"
    encoder.compile = encoder.packs = True  # as on a GPU
    encoder.warm_up()
    assert sorted(padded) == [64, 128, 256, 512, 1024]  # CPU flex buckets start at one FLEX_BLOCK (64 rows)
    met = set(padded)
    padded.clear()
    for count in range(1, len(dna_reads) + 1):  # whatever a run packs lands in a bucket met already
        encoder.run(encoder.prepare(dna_reads[:count]))
    assert padded and set(padded) <= met


def test_dnabert_fast_tokenizer_matches_encode(dna_dir, dna_reads):
    tokenizer = load_dnabert(str(dna_dir), CPU).tokenizer
    flat, lengths = tokenizer.encode_many(dna_reads)
    assert flat.tolist() == [t for s in dna_reads for t in tokenizer.encode(s)]
    assert lengths.tolist() == [len(tokenizer.encode(s)) for s in dna_reads]


def test_pack_flat_builds_the_same_batches_as_pack():
    rng = random.Random(2)
    token_lists = [[rng.randint(0, 30) for _ in range(rng.randint(1, 90))] for _ in range(200)]
    flat = np.array([t for ids in token_lists for t in ids])
    lengths = np.array([len(ids) for ids in token_lists])
    for budget in (1, 64, 500, 10_000):
        for a, b in zip(pack(token_lists, budget), pack_flat(flat, lengths, budget), strict=True):
            assert a.order == b.order and a.max_seqlen == b.max_seqlen and a.bounds == b.bounds
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions)
            assert torch.equal(a.cu_seqlens, b.cu_seqlens)


def test_non_finite_embeddings_fail_loudly_with_the_offending_inputs(esm_path):
    encoder = load_esm2(str(esm_path), CPU)
    tryptophan = encoder.alphabet.get_idx("W")
    with torch.no_grad():
        saved = encoder.model.embed_tokens.weight[tryptophan].clone()
        encoder.model.embed_tokens.weight[tryptophan] = float("nan")
    try:
        with pytest.raises(NonFiniteEmbedding) as raised:
            encoder.embed(["MKA", "MWK", "AAA", "WW"])
        assert raised.value.indices == [1, 3]
    finally:
        with torch.no_grad():
            encoder.model.embed_tokens.weight[tryptophan] = saved


def test_pipelined_predictor_equals_sequential(tmp_path, reference):
    """Host work of group g + 1 while group g runs: same results, same order."""
    from core.classifier import load_classifier
    from core.reads import read_records as read_fasta
    from core.pipeline import Predictor
    from job.cli import main

    assert main(["make-demo-models", str(tmp_path)]) == 0
    esm = load_esm2(str(tmp_path / "esm2_demo.pt"), CPU)
    dna = load_dnabert(str(tmp_path / "dnabert_demo"), CPU)
    classifier = load_classifier(str(tmp_path / "classifier_500.safetensors"), CPU)
    with open(reference / "test_fixed_500bp.fa", "rb") as handle:
        records = list(read_fasta(handle, "x.fa"))
    records = records * 5
    results = {}
    for pipelined in (False, True):
        predictor = Predictor(dna, esm, classifier, 500, group_reads=3, pipelined=pipelined)
        results[pipelined] = list(predictor.predict(records, with_features=True))
        assert predictor.timings["prepare"] > 0
    assert len(results[False]) == len(results[True]) == len(records)
    for a, b in zip(results[False], results[True]):
        assert a.summary == b.summary and a.frames == b.frames
        assert np.array_equal(a.features, b.features)


def test_a_read_error_still_answers_the_reads_before_it(tmp_path):
    from core.classifier import load_classifier
    from core.reads import Record
    from core.pipeline import Predictor
    from job.cli import main

    assert main(["make-demo-models", str(tmp_path)]) == 0
    predictor = Predictor(
        load_dnabert(str(tmp_path / "dnabert_demo"), CPU), load_esm2(str(tmp_path / "esm2_demo.pt"), CPU),
        load_classifier(str(tmp_path / "classifier_500.safetensors"), CPU), 500, group_reads=2, pipelined=True,
    )
    rng = random.Random(3)

    def records():
        for i in range(3):
            yield Record(f"r{i}", "".join(rng.choices("ACG", k=400)), i + 1)
        raise ValueError("bad record")

    answered = []
    with pytest.raises(ValueError, match="bad record"):
        for result in predictor.predict(records()):
            answered.append(result.summary.read_id)
    assert answered == ["r0", "r1"]


def test_no_compile_flows_from_the_command_line_to_the_encoders(tmp_path, monkeypatch):
    import job.batch
    from core.pipeline import load_predictor
    from job.cli import main

    assert main(["make-demo-models", str(tmp_path)]) == 0
    models = [str(tmp_path / "esm2_demo.pt"), str(tmp_path / "dnabert_demo"), str(tmp_path / "classifier_500.pth")]
    configs = []
    monkeypatch.setattr(job.batch, "run_batch", lambda config, *_: configs.append(config) or 0)
    common = ["run", "--input", "x.fa", "--output", str(tmp_path / "out"), "--esm-model", models[0],
              "--dnabert-model", models[1], "--classifier", models[2]]
    assert main(common) == 0 and main([*common, "--no-compile"]) == 0 and main([*common, "--compile"]) == 0
    assert [config.compile for config in configs] == [None, False, True]
    for compile in (None, False):  # the CPU engine runs eagerly unless asked to compile
        predictor = load_predictor(*models, device="cpu", compile=compile)
        assert not predictor.esm.compile and not predictor.dnabert.compile
    predictor = load_predictor(*models, device="cpu", compile=True)
    assert predictor.esm.compile and predictor.dnabert.compile and predictor.compiled


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_a_compiler_error_falls_back_to_eager_and_says_why(monkeypatch, caplog):
    import logging

    from core.engine import Compiled, compile_state

    def broken_backend(graph, example_inputs):
        raise RuntimeError("cannot lower this graph")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, backend=broken_backend))
    part = Compiled(_double, dynamic_args=(0,))
    with caplog.at_level(logging.WARNING, logger="core.engine"):
        assert torch.equal(part(torch.ones(3), compile=True), torch.full((3,), 2.0))
        assert torch.equal(part(torch.ones(4), compile=True), torch.full((4,), 2.0))  # eager from now on
    assert "BackendCompilerFailed" in part.error and "cannot lower this graph" in part.error
    assert compile_state(True, (part,)).startswith("eager (BackendCompilerFailed")
    (record,) = caplog.records  # logged once, when it happened, with the function and the reason
    assert "_double" in record.getMessage() and "cannot lower this graph" in record.getMessage()


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
])
def test_a_runtime_error_in_a_compiled_call_raises_and_keeps_it_compiled(monkeypatch, error):
    from core.engine import Compiled, compile_state

    def compiled_call(*args):
        raise error

    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled_call)
    part = Compiled(_double, dynamic_args=(0,))
    with pytest.raises(type(error), match=str(error)[:20]):
        part(torch.ones(3), compile=True)
    assert part.error is None and compile_state(True, (part,)) == "compiled"
    with pytest.raises(type(error)):  # the next call goes to the compiled code again
        part(torch.ones(3), compile=True)
