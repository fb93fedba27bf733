"""`virnucpro bench`: our encoders and pipeline against the published paths, on one device, in one run.

    python3 -m job.cli bench [--device cuda] [--json PATH] [--quick]   # in a checkout (= virnucpro bench)
    python3 benchmarks/bench.py [--device cuda] [--json PATH] [--quick]

Builds full-size ESM-2 3B (36 layers, 2560 wide, 40 heads) and DNABERT-S (12 x 768) with
random weights (nothing is downloaded) and times, in one process on one device:

- the fp16 matrix-multiply rate (one big GEMM), which every row is compared with;
- ESM-2: the published path (fair-esm, fp32, padded batches of 2048 tokens, per-sequence
  pooling), Hugging Face EsmModel in fp16 with SDPA on padded 32k-token batches, and ours
  (packed fp16, varlen attention), compiled and eager;
- DNABERT-S: the published loop (one sequence per call, fp32, our model) and ours (packed
  fp16, FlexAttention with ALiBi), compiled and eager;
- the whole pipeline (Predictor over synthetic 500-bp reads with one or two open frames)
  against ESM-2 alone on the same frames;

and prints one table (tokens/s, sequences/s, TFLOP/s, share of the measured GEMM rate, peak
GPU memory), the targets of issue 3, a kernel profile of our encoders, and writes JSON.
`--quick` runs tiny models on the CPU so CI exercises every code path of the command.
It uses core/'s public API only; one function per section (`run_bench` lists them).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import platform
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import esm
import numpy as np
import torch
import torch.nn.functional as F

from core import attention as attention_module
from core.attention import Segments
from core.classifier import Classifier, MLPClassifier
from core.dnabert import (DNABERTConfig, DNABERTEncoder, DNABERTModel, DNATokenizer, load_published_state_dict,
                          random_state_dict, train_bpe_tokenizer)
from core.esm2 import ESM2Encoder, model_from_checkpoint
from core.reads import Record
from core.frames import chunk_record, open_frames
from core.pipeline import Predictor

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
STOPS = {"TAA", "TAG", "TGA"}
BASES = "ACGT"
COMPLEMENT = str.maketrans("ACGT", "TGCA")

TARGETS = {
    "esm_tokens_per_s": 90_000,
    "esm_vs_hf": 1.8,
    "dna_tokens_per_s": 1_500_000,
    "dna_share_of_esm_time": 0.10,
    "pipeline_vs_esm_only": 0.90,
}


@dataclass(frozen=True)
class Sizes:
    esm_layers: int
    esm_dim: int
    esm_heads: int
    dna_layers: int
    dna_hidden: int
    dna_heads: int
    dna_intermediate: int
    dna_vocab: int
    proteins_ours: int  # ESM-2 engine rows: proteins of 30-166 aa, 70% at 166
    proteins_hf: int
    proteins_published: int
    dna_single: int  # DNABERT-S one-per-call sequences
    reads: int  # pipeline reads (500 bp, one or two open frames)
    warmup_reads: int
    matmul: int
    tokenizer_corpus: int


FULL = Sizes(36, 2560, 40, 12, 768, 12, 3072, 4096, 4000, 1500, 250, 200, 3000, 300, 8192, 3000)
QUICK = Sizes(2, 64, 4, 2, 48, 6, 96, 300, 40, 24, 12, 8, 40, 8, 256, 200)


# --- synthetic inputs -------------------------------------------------------------------------

def _codons() -> tuple[list[str], list[str]]:
    """Codons that are no stop, and those whose reverse complement is no stop either."""
    every = [a + b + c for a in BASES for b in BASES for c in BASES]
    open_forward = [c for c in every if c not in STOPS]
    both = [c for c in open_forward if c[::-1].translate(COMPLEMENT) not in STOPS]
    return open_forward, both


def synthetic_reads(count: int, seed: int = 0, length: int = 500) -> list[Record]:
    """500-bp reads with one open frame (F1) or two (F1 and R3), alternately.

    F1's codons avoid stops; for two-frame reads they also avoid codons whose reverse
    complement is a stop, which opens R3 (its codons are F1's, reverse complemented). The
    other frames of random codons almost surely hold a stop.
    """
    rng = random.Random(seed)
    open_forward, both = _codons()
    records = []
    for i in range(count):
        pool = both if i % 2 else open_forward
        body = "".join(rng.choice(pool) for _ in range(length // 3))
        tail = "".join(rng.choice(BASES) for _ in range(length - len(body)))
        records.append(Record(f"read_{i}", body + tail, i + 1))
    return records


def synthetic_proteins(count: int, seed: int = 1) -> list[str]:
    """Proteins of 30-166 residues, 70% of them 166 long (a 500-bp chunk's longest frame)."""
    rng = random.Random(seed)
    lengths = [166 if rng.random() < 0.7 else rng.randint(30, 165) for _ in range(count)]
    return ["".join(rng.choices(AMINO_ACIDS, k=n)) for n in lengths]


def bpe_tokenizer(vocab: int, reads: int, seed: int = 2) -> tuple[DNATokenizer, int]:
    """A DNABERT-style BPE tokenizer trained on random DNA (the real tokenizer.json cannot be
    downloaded here), and its vocabulary size."""
    rng = random.Random(seed)
    trained = train_bpe_tokenizer(["".join(rng.choices(BASES, k=500)) for _ in range(reads)], vocab)
    return DNATokenizer(trained), trained.get_vocab_size()


# --- measuring --------------------------------------------------------------------------------

class Clock:
    """Wall time around device work (synchronised before and after) and peak GPU memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, work: Callable[[], object]) -> tuple[float, float | None, object]:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        result = work()
        self.sync()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return seconds, peak, result


class GcTimer:
    """Seconds the cyclic garbage collector ran, and its full (generation 2) runs, in a block."""

    def __enter__(self) -> GcTimer:
        self.seconds, self.full, self._started = 0.0, 0, None
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.full += info.get("generation") == 2


def matmul_rate(device: torch.device, n: int) -> float:
    """TFLOP/s of an n x n x n fp16 (CPU: fp32) product on random data, median of 10."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - started)
    return 2 * n**3 / float(np.median(times)) / 1e12


def esm_flop_per_token(layers: int, dim: int, lengths: np.ndarray) -> float:
    """Matrix FLOPs per token of ESM-2: 24 d^2 per layer (q, k, v, out, 4x MLP), plus
    attention 4 * L * d per layer at the token-weighted mean length."""
    mean_length = float((lengths.astype(np.float64) ** 2).sum() / lengths.sum())
    return layers * (24 * dim * dim + 4 * mean_length * dim)


def dna_flop_per_token(layers: int, hidden: int, intermediate: int, lengths: np.ndarray) -> float:
    """DNABERT-S: Wqkv 6 h^2, dense 2 h^2, gated 4 h i, wo 2 h i per layer, plus attention."""
    mean_length = float((lengths.astype(np.float64) ** 2).sum() / lengths.sum())
    return layers * (8 * hidden * hidden + 6 * hidden * intermediate + 4 * mean_length * hidden)


class Report:
    def __init__(self, device: torch.device, quick: bool) -> None:
        self.device = device
        self.data: dict = {
            "date": datetime.date.today().isoformat(),
            "quick": quick,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "rows": [],
            "pipeline": {},
            "checks": {},
            "targets": {},
            "environment": {},
            "profile": {},
            "errors": [],
            "notes": [],
        }
        self.matmul = float("nan")

    def row(self, model: str, path: str, tokens: int, sequences: int, seconds: float,
            peak: float | None, flop_per_token: float, **extra) -> dict:
        tflops = tokens * flop_per_token / seconds / 1e12
        entry = {
            "model": model, "path": path, "tokens": tokens, "sequences": sequences,
            "seconds": round(seconds, 4), "tokens_per_s": tokens / seconds,
            "sequences_per_s": sequences / seconds, "gflop_per_token": flop_per_token / 1e9,
            "tflops": tflops, "share_of_matmul": tflops / self.matmul if self.matmul else None,
            "peak_gib": peak, **extra,
        }
        self.data["rows"].append(entry)
        print(f"  {model:<10} {path:<44} {entry['tokens_per_s']:>12,.0f} tok/s  "
              f"{entry['sequences_per_s']:>10,.1f} seq/s  {tflops:7.1f} TFLOP/s"
              + (f"  peak {peak:.1f} GiB" if peak is not None else ""), flush=True)
        return entry

    def error(self, section: str, error: BaseException) -> None:
        message = f"{section}: {type(error).__name__}: {error}"
        self.data["errors"].append({"section": section, "error": message,
                                    "traceback": traceback.format_exc()[-3000:]})
        print(f"  ERROR {message}", flush=True)

    def write(self, path: str | None) -> None:
        if path:
            with open(path, "w") as handle:
                json.dump(self.data, handle, indent=2, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _cosines(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    actual, expected = actual.double(), expected.double()
    cosine = F.cosine_similarity(actual, expected, dim=1)
    relative = (actual - expected).norm(dim=1) / expected.norm(dim=1)
    return {"min_cosine": cosine.min().item(), "max_relative_error": relative.max().item(),
            "finite": bool(torch.isfinite(actual).all())}


# --- ESM-2 paths ------------------------------------------------------------------------------

def fair_esm_published(model, token_lists: list[list[int]], device: torch.device, layers: int,
                       toks_per_batch: int = 2048) -> torch.Tensor:
    """fair-esm's extract.py: length-sorted padded batches of <= toks_per_batch tokens (fp32),
    representation of the last layer, t[i, 1 : min(1024, L) + 1].mean(0) per sequence."""
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    batches, current, longest = [], [], 0
    for i in order:
        length = len(token_lists[i])
        if current and max(longest, length) * (len(current) + 1) > toks_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    out = torch.empty(len(token_lists), model.embed_dim)
    with torch.no_grad():
        for batch in batches:
            width = max(len(token_lists[i]) for i in batch)
            tokens = torch.full((len(batch), width), model.padding_idx, dtype=torch.int64)
            for row, i in enumerate(batch):
                tokens[row, : len(token_lists[i])] = torch.tensor(token_lists[i])
            result = model(tokens.to(device), repr_layers=[layers])
            hidden = result["representations"][layers]
            for row, i in enumerate(batch):
                residues = len(token_lists[i]) - 2
                out[i] = hidden[row, 1: min(1024, residues) + 1].mean(0).clone().cpu()
    return out


def hf_esm_model(sizes: Sizes, device: torch.device):
    """Hugging Face EsmModel of ESM-2's shape, random init, fp16, SDPA attention."""
    from transformers import EsmConfig, EsmModel

    config = EsmConfig(
        vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=sizes.esm_dim,
        num_hidden_layers=sizes.esm_layers, num_attention_heads=sizes.esm_heads,
        intermediate_size=4 * sizes.esm_dim, position_embedding_type="rotary", token_dropout=True,
        emb_layer_norm_before=False, max_position_embeddings=1026, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "sdpa"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = EsmModel(config, add_pooling_layer=False)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval(), getattr(model.config, "_attn_implementation", "?")


def hf_esm_padded(model, token_lists: list[list[int]], device: torch.device,
                  batch_tokens: int = 32768) -> torch.Tensor:
    """Length-sorted padded batches of <= batch_tokens (padded) tokens, masked mean over
    residues 1 .. min(1024, L) on the GPU, one copy back per batch."""
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    out = torch.empty(len(token_lists), model.config.hidden_size)
    start = 0
    with torch.inference_mode():
        while start < len(order):
            width = len(token_lists[order[start]])
            count = max(1, batch_tokens // width)
            batch = order[start: start + count]
            start += count
            tokens = torch.full((len(batch), width), 1, dtype=torch.int64)
            lengths = torch.tensor([len(token_lists[i]) for i in batch])
            for row, i in enumerate(batch):
                tokens[row, : len(token_lists[i])] = torch.tensor(token_lists[i])
            tokens, lengths = tokens.to(device), lengths.to(device)
            columns = torch.arange(width, device=device)
            attention_mask = (columns[None, :] < lengths[:, None]).long()
            hidden = model(input_ids=tokens, attention_mask=attention_mask).last_hidden_state.float()
            pooled_rows = (columns[None, :] >= 1) & (columns[None, :] <= torch.clamp(lengths - 2, max=1024)[:, None])
            pooled = (hidden * pooled_rows[..., None]).sum(1) / pooled_rows.sum(1, keepdim=True)
            out[batch] = pooled.cpu()
    return out


# --- DNABERT-S: the published loop --------------------------------------------------------

def dna_published_single(model: DNABERTModel, token_lists: list[list[int]], device: torch.device) -> torch.Tensor:
    """The published loop: one sequence per call, mean of the last layer over all tokens
    (float32 [n, hidden] on the CPU; the model in float32 is the GPU tests' oracle)."""
    out = torch.empty(len(token_lists), model.config.hidden_size)
    with torch.inference_mode():
        for i, ids in enumerate(token_lists):
            tokens = torch.tensor(ids, device=device)
            bounds = [0, len(ids)]
            segments = Segments(torch.tensor(bounds, dtype=torch.int32, device=device), bounds, len(ids), len(ids))
            out[i] = model(tokens, segments).float().mean(0).cpu()
    return out


def dnabert_model(config: DNABERTConfig, device: torch.device, dtype: torch.dtype) -> DNABERTModel:
    """DNABERT-S of `config` with the random weights `write_demo_model` writes (seed 0)."""
    model = DNABERTModel(config, dtype)
    load_published_state_dict(model, random_state_dict(config, seed=0))
    return model.to(device).eval().requires_grad_(False)


# --- the sections -----------------------------------------------------------------------------

@dataclass
class Bench:
    """One run: where it measures, its sizes, the report it fills, and the shared inputs."""

    device: torch.device
    quick: bool
    json_path: str | None
    sizes: Sizes
    report: Report
    clock: Clock
    reads: list = field(default_factory=list)
    warm_reads: list = field(default_factory=list)
    frame_proteins: list[str] = field(default_factory=list)
    frame_nucleotides: list[str] = field(default_factory=list)
    proteins: list[str] = field(default_factory=list)

    @property
    def data(self) -> dict:
        return self.report.data

    @property
    def half(self) -> torch.dtype:
        """The encoders' dtype: float16 on a GPU, float32 on the CPU (--quick)."""
        return torch.float16 if self.device.type == "cuda" else torch.float32

    def encoder_options(self) -> dict:
        """--quick exercises a non-reference backend on the CPU, uncompiled."""
        return {"attention": "sdpa_padded", "compile": False} if self.quick else {}

    def section(self, name: str, work: Callable[..., object], *args: object) -> object | None:
        """Run one section; a failure is recorded and costs only that section."""
        print(f"\n== {name}", flush=True)
        try:
            return work(self, *args)
        except Exception as error:  # one broken section must not cost the others
            self.report.error(name, error)
            return None
        finally:
            self.report.write(self.json_path)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def environment(bench: Bench) -> None:
    env = bench.data["environment"]
    env["cuda"] = torch.version.cuda
    for name in attention_module.ALL_BACKENDS:
        env[f"importable_{name}"] = attention_module.importable(name)
    try:
        from torch.nn.attention.varlen import varlen_attn
        env["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except Exception as error:  # absent in older torch
        env["varlen_attn_signature"] = f"unavailable: {error}"
    for module in ("esm", "transformers", "triton", "flash_attn"):
        try:
            env[module] = getattr(__import__(module), "__version__", "present")
        except Exception:
            env[module] = None
    print("  " + json.dumps(env))


def matmul(bench: Bench) -> None:
    bench.report.matmul = matmul_rate(bench.device, bench.sizes.matmul)
    bench.data["matmul_tflops"] = bench.report.matmul
    print(f"  {'fp16' if bench.device.type == 'cuda' else 'fp32'} {bench.sizes.matmul}^3 GEMM: "
          f"{bench.report.matmul:.1f} TFLOP/s")


def make_inputs(bench: Bench) -> None:
    sizes = bench.sizes
    bench.reads = synthetic_reads(sizes.reads)
    bench.warm_reads = synthetic_reads(sizes.warmup_reads, seed=9)
    chunks = [c for r in bench.reads for c in chunk_record(r.id, r.sequence, 500)]
    frames = [f for kept in open_frames(chunks) for f in kept]
    bench.frame_proteins = [f.protein for f in frames]
    bench.frame_nucleotides = [f.nucleotide for f in frames]
    bench.proteins = synthetic_proteins(sizes.proteins_ours)
    bench.data["inputs"] = {"reads": len(bench.reads), "frames": len(frames),
                            "frames_per_read": len(frames) / len(bench.reads), "engine_proteins": len(bench.proteins)}


def esm2(bench: Bench) -> ESM2Encoder:
    """fair-esm (published, fp32), Hugging Face EsmModel (fp16 SDPA) and ours, compiled and
    eager, on the same proteins; ours checked against fair-esm."""
    sizes, device, clock, report = bench.sizes, bench.device, bench.clock, bench.report
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model_name = "ESM-2 3B" if not bench.quick else "ESM-2 tiny"
    layers = sizes.esm_layers
    with torch.device(device):
        fair = esm.model.esm2.ESM2(num_layers=layers, embed_dim=sizes.esm_dim, attention_heads=sizes.esm_heads,
                                   alphabet=alphabet).eval()
    config = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=sizes.esm_dim,
                                encoder_attention_heads=sizes.esm_heads, token_dropout=True)
    ours = model_from_checkpoint({"model": fair.state_dict(), "cfg": {"model": config}}, "fair-esm's random init",
                                 device, bench.half)
    encoder = ESM2Encoder(ours, alphabet, device, None, **bench.encoder_options())
    bench.data["esm_engine"] = _warmed_up(encoder, clock)
    flat, lengths = encoder.tokenize_many(bench.proteins)
    token_lists = [t.tolist() for t in np.split(flat, np.cumsum(lengths)[:-1])]

    subset = token_lists[: sizes.proteins_published]
    fair_esm_published(fair, subset[:8], device, layers)  # warm-up
    seconds, peak, published_out = clock.time(lambda: fair_esm_published(fair, subset, device, layers))
    report.row(model_name, "fair-esm fp32 padded 2048 (published)", int(lengths[: len(subset)].sum()), len(subset),
               seconds, peak, esm_flop_per_token(layers, sizes.esm_dim, lengths[: len(subset)]))
    fair = None  # free its weights before ours run
    _free(device)

    try:
        hf, implementation = hf_esm_model(sizes, device)
        subset = token_lists[: sizes.proteins_hf]
        hf_esm_padded(hf, subset[:64], device)  # warm-up
        seconds, peak, _ = clock.time(lambda: hf_esm_padded(hf, subset, device))
        report.row(model_name, f"HF EsmModel fp16 {implementation} padded 32k", int(lengths[: len(subset)].sum()),
                   len(subset), seconds, peak, esm_flop_per_token(layers, sizes.esm_dim, lengths[: len(subset)]))
        hf = None  # free its weights before ours run
    except ImportError as error:
        bench.data["notes"].append(f"HF EsmModel path skipped: {error}")
        print(f"  HF EsmModel path skipped: {error}")
    _free(device)

    flop = esm_flop_per_token(layers, sizes.esm_dim, lengths)
    warm = encoder.prepare(bench.proteins[: max(8, len(bench.proteins) // 4)])
    clock.time(lambda: encoder.run(warm)[0].cpu())  # a first pass, untimed
    host_started = time.perf_counter()
    prepared = encoder.prepare(bench.proteins)
    host_seconds = time.perf_counter() - host_started
    runs = [clock.time(lambda: encoder.run(prepared)[0].cpu()) for _ in range(2)]
    seconds, peak, ours_out = min(runs, key=lambda r: r[0])
    report.row(model_name, f"ours packed {encoder.backend}", int(lengths.sum()), len(bench.proteins), seconds, peak,
               flop, repeat_seconds=[round(r[0], 4) for r in runs], host_prepare_seconds=round(host_seconds, 4),
               batch_tokens=encoder.batch_tokens, batches=len(prepared.batches))
    if encoder.compile:  # the same model without torch.compile, for the record
        eager = ESM2Encoder(ours, alphabet, device, encoder.batch_tokens, attention=encoder.attention.name,
                            compile=False)
        clock.time(lambda: eager.run(warm)[0].cpu())
        seconds, peak, _ = clock.time(lambda: eager.run(prepared)[0].cpu())
        report.row(model_name, f"ours packed {eager.backend}", int(lengths.sum()), len(bench.proteins), seconds,
                   peak, flop)
    check = bench.data["checks"]["esm_ours_vs_fair_esm_fp32"] = _cosines(ours_out[: len(published_out)], published_out)
    print(f"  ours vs fair-esm fp32 on {len(published_out)} proteins: {check}")
    return encoder


def dnabert(bench: Bench) -> DNABERTEncoder:
    """The published loop (one sequence per call, fp32) and ours, compiled and eager, on the
    frames of the synthetic reads; ours checked against the published loop."""
    sizes, device, clock, report = bench.sizes, bench.device, bench.clock, bench.report
    tokenizer, vocab = bpe_tokenizer(sizes.dna_vocab, sizes.tokenizer_corpus)
    config = DNABERTConfig(vocab_size=vocab, hidden_size=sizes.dna_hidden, num_hidden_layers=sizes.dna_layers,
                           num_attention_heads=sizes.dna_heads, intermediate_size=sizes.dna_intermediate)
    model_name = "DNABERT-S" if not bench.quick else "DNABERT tiny"
    flat, lengths = tokenizer.encode_many(bench.frame_nucleotides)
    token_lists = [t.tolist() for t in np.split(flat, np.cumsum(lengths)[:-1])]
    bench.data["inputs"]["dna_tokens_per_frame"] = float(lengths.mean())
    bench.data["inputs"]["esm_tokens_per_frame"] = float(np.mean([len(p) + 2 for p in bench.frame_proteins]))
    flop = dna_flop_per_token(config.num_hidden_layers, config.hidden_size, config.intermediate_size, lengths)

    reference = dnabert_model(config, device, torch.float32)
    subset = token_lists[: sizes.dna_single]
    dna_published_single(reference, subset[:4], device)
    seconds, peak, single_out = clock.time(lambda: dna_published_single(reference, subset, device))
    report.row(model_name, "one per call fp32 (published loop)", int(lengths[: len(subset)].sum()),
               len(subset), seconds, peak, flop)
    reference = None
    _free(device)

    model = dnabert_model(config, device, bench.half)
    encoder = DNABERTEncoder(model, tokenizer, device, None, **bench.encoder_options())
    bench.data["dna_engine"] = _warmed_up(encoder, clock)
    prepared = encoder.prepare(bench.frame_nucleotides)
    clock.time(lambda: encoder.run(prepared)[0].cpu())  # a first pass over this set, untimed
    runs = [clock.time(lambda: encoder.run(prepared)[0].cpu()) for _ in range(3)]
    seconds, peak, ours_out = min(runs, key=lambda r: r[0])
    report.row(model_name, f"ours packed {encoder.backend}", int(lengths.sum()), len(token_lists), seconds, peak,
               flop, repeat_seconds=[round(r[0], 4) for r in runs], batch_tokens=encoder.batch_tokens,
               batches=len(prepared.batches))
    if encoder.compile:
        eager = DNABERTEncoder(model, tokenizer, device, encoder.batch_tokens, attention=encoder.attention.name,
                               compile=False)
        clock.time(lambda: eager.run(prepared)[0].cpu())
        seconds, peak, _ = clock.time(lambda: eager.run(prepared)[0].cpu())
        report.row(model_name, f"ours packed {eager.backend}", int(lengths.sum()), len(token_lists), seconds, peak,
                   flop)
    check = bench.data["checks"]["dna_ours_vs_fp32_one_per_call"] = _cosines(ours_out[: len(single_out)], single_out)
    print(f"  ours vs fp32 one-per-call on {len(single_out)} frames: {check}")
    return encoder


def same_frames(bench: Bench, esm_encoder: ESM2Encoder, dna_encoder: DNABERTEncoder) -> None:
    """Each encoder alone on the frames of the synthetic reads: DNABERT-S's share of ESM-2's
    time, and the ESM-2-only frame rate the pipeline is measured against."""
    clock, proteins, nucleotides = bench.clock, bench.frame_proteins, bench.frame_nucleotides
    esm_encoder.embed(proteins[:64])
    dna_seconds, _, _ = clock.time(lambda: dna_encoder.embed(nucleotides))
    esm_seconds, esm_peak, _ = clock.time(lambda: esm_encoder.embed(proteins))
    frames = len(proteins)
    same = {"frames": frames, "dna_seconds": dna_seconds, "esm_seconds": esm_seconds,
            "dna_ms_per_frame": 1e3 * dna_seconds / frames, "esm_ms_per_frame": 1e3 * esm_seconds / frames,
            "dna_share_of_esm_time": dna_seconds / esm_seconds, "esm_only_frames_per_s": frames / esm_seconds,
            "esm_only_peak_gib": esm_peak}
    bench.data["pipeline"].update(same)
    print(f"  {frames} frames: DNABERT-S {same['dna_ms_per_frame']:.3f} ms/frame, ESM-2 "
          f"{same['esm_ms_per_frame']:.3f} ms/frame (DNABERT-S = {100 * same['dna_share_of_esm_time']:.1f}% "
          f"of ESM-2); ESM-2 alone {same['esm_only_frames_per_s']:,.0f} frames/s")


def pipeline(bench: Bench, esm_encoder: ESM2Encoder, dna_encoder: DNABERTEncoder) -> None:
    """The Predictor over the synthetic reads (default, larger groups, not pipelined),
    against ESM-2 alone on the same frames."""
    classifier_model = MLPClassifier(dna_encoder.dim + esm_encoder.dim, 512).to(bench.device).eval()
    classifier = Classifier(classifier_model, 500, "random")
    variants = [("default", {}), ("group_reads=2048", {"group_reads": 2048}), ("not pipelined", {"pipelined": False})]
    for label, options in variants:
        predictor = Predictor(dna_encoder, esm_encoder, classifier, 500, **options)
        for _ in predictor.predict(bench.warm_reads):
            pass
        passes = [_pipeline_pass(bench, predictor) for _ in range(3 if label == "default" else 2)]
        seconds, peak, counted, timings = min(passes, key=lambda p: p[0])
        frames_per_s = counted / seconds
        ratio = frames_per_s / bench.data["pipeline"]["esm_only_frames_per_s"]
        reads = len(bench.reads)
        result = {"reads": reads, "frames": counted, "seconds": seconds,
                  "pass_seconds": [round(p[0], 3) for p in passes], "frames_per_s": frames_per_s,
                  "reads_per_s": reads / seconds, "peak_gib": peak, "group_reads": predictor.group_reads,
                  "pipelined": predictor.pipelined, "host_seconds": timings,
                  "host_seconds_per_pass": [p[3] for p in passes], "vs_esm_only": ratio}
        bench.data["pipeline"].setdefault("variants", {})[label] = result
        print(f"  pipeline {label}: {counted} frames of {reads} reads in {seconds:.2f} s "
              f"(passes {result['pass_seconds']}) = {frames_per_s:,.0f} frames/s ({100 * ratio:.1f}% of ESM-2 "
              f"alone), peak {peak if peak is None else round(peak, 1)} GiB, host {result['host_seconds']}")
        if label == "default":
            bench.data["pipeline"].update({
                "pipeline_frames": counted, "pipeline_seconds": seconds, "pipeline_frames_per_s": frames_per_s,
                "pipeline_reads_per_s": reads / seconds, "pipeline_peak_gib": peak,
                "group_reads": predictor.group_reads, "engine": predictor.engine, "pipeline_vs_esm_only": ratio,
            })


def _pipeline_pass(bench: Bench, predictor: Predictor) -> tuple[float, float | None, int, dict]:
    """One timed pass of `predictor` over the reads: (seconds, peak GiB, frames, host timings)."""

    def whole() -> int:
        return sum(len(result.frames) for result in predictor.predict(bench.reads))

    predictor.timings = dict.fromkeys(predictor.timings, 0.0)
    with GcTimer() as gc_timer:
        seconds, peak, counted = bench.clock.time(whole)
    timings = {k: round(v, 3) for k, v in predictor.timings.items()}
    timings.update(gc_seconds=round(gc_timer.seconds, 3), gc_full=gc_timer.full)
    return seconds, peak, counted, timings


def profile(bench: Bench, esm_encoder: ESM2Encoder, dna_encoder: DNABERTEncoder) -> None:
    """Top GPU kernels of one packed batch set of each encoder."""
    profiles = bench.data["profile"]
    profiles["esm"] = _profile(lambda: esm_encoder.run(esm_encoder.prepare(bench.proteins[:400]))[0].cpu())
    profiles["dna"] = _profile(lambda: dna_encoder.run(dna_encoder.prepare(bench.frame_nucleotides[:2000]))[0].cpu())
    for name, rows in profiles.items():
        print(f"  {name}: top kernels by GPU time")
        for row in rows[:12]:
            print(f"    {row['share']:6.1%} {row['ms']:9.2f} ms  {row['calls']:6d}x  {row['name'][:90]}")


def run_bench(device_name: str = "cuda", json_path: str | None = None, quick: bool = False) -> dict:
    """Every section in order on one device; the report's data (also written to json_path)."""
    device = torch.device("cpu" if quick else device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: CUDA was asked for but no CUDA GPU is visible (use --quick on a CPU)")
    torch.manual_seed(0)
    report = Report(device, quick)
    bench = Bench(device, quick, json_path, QUICK if quick else FULL, report, Clock(device))
    print(f"virnucpro bench on {report.data['device']} (torch {torch.__version__})"
          f"{' QUICK: tiny models on CPU' if quick else ''}")
    bench.section("environment", environment)
    bench.section("matmul", matmul)
    make_inputs(bench)
    esm_encoder = bench.section("ESM-2", esm2)
    dna_encoder = bench.section("DNABERT-S", dnabert)
    if esm_encoder is not None and dna_encoder is not None:
        bench.section("same frames: DNABERT-S vs ESM-2, and ESM-2 alone", same_frames, esm_encoder, dna_encoder)
        bench.section("pipeline", pipeline, esm_encoder, dna_encoder)
        if device.type == "cuda":
            bench.section("profile", profile, esm_encoder, dna_encoder)
    else:
        report.error("same frames, pipeline", RuntimeError("an encoder failed to build"))
    _targets(report)
    _print_table(report)
    report.write(json_path)
    return report.data


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warmed_up(encoder: ESM2Encoder | DNABERTEncoder, clock: Clock) -> dict:
    """Compile `encoder` for every batch shape (timed), then say what runs, for the report."""
    seconds, _, _ = clock.time(encoder.warm_up)
    note = encoder.attention.note
    print(f"  ours: {encoder.backend}, batch_tokens {encoder.batch_tokens}, warm-up (compile) {seconds:.1f} s"
          + (f" (skipped: {note})" if note else ""))
    return {"backend": encoder.backend, "attention_note": note, "batch_tokens": encoder.batch_tokens,
            "warm_up_seconds": seconds}


def _profile(work: Callable[[], object]) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    from torch.autograd import DeviceType

    rows = []
    for event in prof.key_averages():
        if getattr(event, "device_type", None) != DeviceType.CUDA:  # kernels only, not the ops above them
            continue
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        if device_us:
            rows.append({"name": event.key, "ms": device_us / 1e3, "calls": event.count})
    total = sum(r["ms"] for r in rows) or 1.0
    for row in rows:
        row["share"] = row["ms"] / total
    return sorted(rows, key=lambda r: -r["ms"])[:25]


def _find(rows: list[dict], model_prefix: str, path_prefix: str) -> dict | None:
    for row in rows:
        if row["model"].startswith(model_prefix) and row["path"].startswith(path_prefix):
            return row
    return None


def _targets(report: Report) -> None:
    data = report.data
    rows, targets = data["rows"], data["targets"]
    ours_esm, hf = _find(rows, "ESM-2", "ours"), _find(rows, "ESM-2", "HF")
    ours_dna = _find(rows, "DNABERT", "ours")
    if ours_esm:
        targets["esm_tokens_per_s"] = ours_esm["tokens_per_s"]
    if ours_esm and hf:
        targets["esm_vs_hf"] = ours_esm["tokens_per_s"] / hf["tokens_per_s"]
    if ours_dna:
        targets["dna_tokens_per_s"] = ours_dna["tokens_per_s"]
    if "dna_share_of_esm_time" in data["pipeline"]:
        targets["dna_share_of_esm_time"] = data["pipeline"]["dna_share_of_esm_time"]
    if "pipeline_vs_esm_only" in data["pipeline"]:
        targets["pipeline_vs_esm_only"] = data["pipeline"]["pipeline_vs_esm_only"]
    verdicts = {}
    for name, goal in TARGETS.items():
        if name not in targets:
            verdicts[name] = "not measured"
            continue
        value = targets[name]
        met = value <= goal if name == "dna_share_of_esm_time" else value >= goal
        verdicts[name] = "n/a (quick)" if data["quick"] else ("met" if met else "MISSED")
    data["target_goals"] = TARGETS
    data["target_verdicts"] = verdicts


def _print_table(report: Report) -> None:
    data = report.data
    print(f"\n== results: {data['device']}, torch {data['torch']}, {data['date']}"
          + (" (QUICK: tiny CPU models, not a measurement of the engine)" if data["quick"] else ""))
    kind = "fp32" if data["quick"] else "fp16"
    print(f"{kind} GEMM reference ({FULL.matmul if not data['quick'] else QUICK.matmul}^3): "
          f"{data.get('matmul_tflops', float('nan')):.1f} TFLOP/s")
    header = "| model | path | tokens/s | sequences/s | TFLOP/s | share of GEMM rate | peak GiB |"
    print(header)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in data["rows"]:
        share = row["share_of_matmul"]
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        print(f"| {row['model']} | {row['path']} | {row['tokens_per_s']:,.0f} | {row['sequences_per_s']:,.1f} | "
              f"{row['tflops']:.1f} | {'-' if share is None else f'{share:.1%}'} | {peak} |")
    pipeline = data["pipeline"]
    if "pipeline_frames_per_s" in pipeline:
        print(f"pipeline: {pipeline['pipeline_frames_per_s']:,.0f} frames/s vs ESM-2 alone "
              f"{pipeline['esm_only_frames_per_s']:,.0f} frames/s on the same {pipeline['frames']} frames; "
              f"DNABERT-S time per frame = {100 * pipeline['dna_share_of_esm_time']:.1f}% of ESM-2's")
    for name, verdict in data.get("target_verdicts", {}).items():
        value = data["targets"].get(name)
        shown = "-" if value is None else (f"{value:,.3f}" if value < 100 else f"{value:,.0f}")
        print(f"target {name}: {shown} (goal {TARGETS[name]:,}) {verdict}")
    if data["errors"]:
        print(f"{len(data['errors'])} section(s) failed: " + "; ".join(e["error"][:200] for e in data["errors"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="device to measure (default: cuda)")
    parser.add_argument("--json", help="write the full results here")
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU: exercises every path")
    args = parser.parse_args()
    data = run_bench(args.device, args.json, args.quick)
    return 1 if data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
