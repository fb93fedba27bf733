"""`virnucpro bench`: the GPU engine against the published paths, on one GPU, in one run.

    virnucpro bench [--device cuda] [--json PATH] [--quick]

Builds full-size ESM-2 3B (36 layers, 2560 wide, 40 heads) and DNABERT-S (12 x 768) with
random weights (nothing is downloaded) and times, in one process on one device:

- the fp16 matrix-multiply rate (one big GEMM), which every row is compared with;
- ESM-2: the published path (fair-esm, fp32, padded batches of 2048 tokens, per-sequence
  pooling), Hugging Face EsmModel in fp16 with SDPA on padded 32k-token batches, and ours
  (packed fp16, varlen attention);
- DNABERT-S: the published path (one sequence per call, fp32; our architecture-equivalent
  reference), the published batched path (256 per batch, padded dense attention, fp16
  autocast; again our equivalent), and ours (packed fp16, FlexAttention with ALiBi);
- the whole pipeline (Predictor over synthetic 500-bp reads with one or two open frames)
  against ESM-2 alone on the same frames;

and prints one table (tokens/s, sequences/s, TFLOP/s, share of the measured GEMM rate, peak
GPU memory), the targets of issue 3, a kernel profile of our encoders, and writes JSON.
`--quick` runs tiny models on the CPU so CI exercises every code path of the command.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import math
import platform
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
STOPS = {"TAA", "TAG", "TGA"}
BASES = "ACGT"
COMPLEMENT = str.maketrans("ACGT", "TGCA")

TARGETS = {
    "esm_tokens_per_s": 90_000,
    "esm_vs_hf": 1.8,
    "dna_tokens_per_s": 1_500_000,
    "dna_vs_published_batched": 2.4,
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


def synthetic_reads(count: int, seed: int = 0, length: int = 500):
    """500-bp reads with one open frame (F1) or two (F1 and R3), alternately.

    F1's codons avoid stops; for two-frame reads they also avoid codons whose reverse
    complement is a stop, which opens R3 (its codons are F1's, reverse complemented). The
    other frames of random codons almost surely hold a stop.
    """
    from core.reads import Record

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


def bpe_tokenizer(vocab: int, reads: int, seed: int = 2):
    """A DNABERT-style BPE tokenizer trained on random DNA: the real tokenizer.json cannot be
    downloaded here."""
    from core.dnabert import DNATokenizer, train_bpe_tokenizer

    rng = random.Random(seed)
    return DNATokenizer(train_bpe_tokenizer(["".join(rng.choices(BASES, k=500)) for _ in range(reads)], vocab))


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


@contextlib.contextmanager
def section(report: Report, name: str, json_path: str | None):
    print(f"\n== {name}", flush=True)
    try:
        yield
    except Exception as error:  # one broken section must not cost the others
        report.error(name, error)
    finally:
        report.write(json_path)
        gc.collect()
        if report.device.type == "cuda":
            torch.cuda.empty_cache()


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


# --- DNABERT-S paths --------------------------------------------------------------------------

def dna_published_single(model, token_lists: list[list[int]], device: torch.device) -> torch.Tensor:
    """The published loop: one sequence per call, fp32, mean of the last layer over all tokens."""
    out = torch.empty(len(token_lists), model.config.hidden_size)
    with torch.inference_mode():
        for i, ids in enumerate(token_lists):
            tokens = torch.tensor(ids, device=device)
            cu = torch.tensor([0, len(ids)], dtype=torch.int32, device=device)
            hidden = model(tokens, cu, len(ids), [0, len(ids)])
            out[i] = hidden.mean(0).cpu()
    return out


def dna_published_batched(model, token_lists: list[list[int]], device: torch.device,
                          batch_size: int = 256) -> torch.Tensor:
    """DNABERT-2's bert_layers.py without its Triton kernel, batched: padded batches of 256
    in input order under fp16 autocast; linear layers on the unpadded tokens, attention
    padded and dense (matmul, + ALiBi + key mask, softmax, matmul), mean over each sequence."""
    from core.dnabert import alibi_bias

    config = model.config
    heads, width = config.num_attention_heads, config.hidden_size
    head_dim = width // heads
    out = torch.empty(len(token_lists), width)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
        for start in range(0, len(token_lists), batch_size):
            batch = token_lists[start: start + batch_size]
            longest = max(map(len, batch))
            tokens = torch.zeros(len(batch), longest, dtype=torch.int64)
            for row, ids in enumerate(batch):
                tokens[row, : len(ids)] = torch.tensor(ids)
            lengths = torch.tensor([len(ids) for ids in batch], device=device)
            tokens = tokens.to(device)
            mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]
            keep = mask.flatten().nonzero().flatten()  # unpad (a sync, as the published code has)
            x = model.embeddings(tokens).reshape(-1, width)[keep]
            bias = alibi_bias(model.alibi_slopes, longest)[None] + torch.where(mask, 0.0, -10000.0)[:, None, None, :]
            for layer in model.encoder.layer:
                qkv = torch.zeros(len(batch) * longest, 3 * width, device=device, dtype=x.dtype)
                projected = layer.attention.self.Wqkv(x)
                qkv = qkv.to(projected.dtype)
                qkv[keep] = projected
                qkv = qkv.view(len(batch), longest, 3, heads, head_dim)
                q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].permute(0, 2, 3, 1), qkv[:, :, 2].transpose(1, 2)
                scores = torch.matmul(q, k) / math.sqrt(head_dim) + bias
                attended = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(-1, width)[keep]
                x = layer.attention.output(attended, x)
                x = layer.mlp(x)
            owner = torch.arange(len(batch), device=device).repeat_interleave(lengths)
            sums = torch.zeros(len(batch), width, device=device).index_add_(0, owner, x.float())
            out[start: start + len(batch)] = (sums / lengths[:, None]).cpu()
    return out


# --- the sections -----------------------------------------------------------------------------

def run_bench(device_name: str = "cuda", json_path: str | None = None, quick: bool = False) -> dict:
    from core import attention as attention_module
    from core.classifier import Classifier, MLPClassifier
    from core.dnabert import DNABERTConfig, DNABERTEncoder, DNABERTModel, _random_state_dict, load_published_state_dict
    from core.esm2 import ESM2, ESM2Encoder
    from core.frames import chunk_record, open_frames
    from core.pipeline import Predictor

    device = torch.device("cpu" if quick else device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("virnucpro bench: --device cuda but no CUDA GPU is visible (use --quick on a CPU)")
    sizes = QUICK if quick else FULL
    report = Report(device, quick)
    clock = Clock(device)
    data = report.data
    torch.manual_seed(0)
    engine_options = {"engine": True, "attention": "sdpa_padded", "compile": False} if quick else {}
    print(f"virnucpro bench on {data['device']} (torch {torch.__version__}){' QUICK: tiny models on CPU' if quick else ''}")

    with section(report, "environment", json_path):
        env = data["environment"]
        env["cuda"] = torch.version.cuda
        for name in attention_module.ALL_BACKENDS:
            env[f"importable_{name}"] = attention_module.importable(name)
        try:
            from torch.nn.attention.varlen import varlen_attn
            env["varlen_attn_signature"] = str(__import__("inspect").signature(varlen_attn))
        except Exception as error:  # absent in older torch
            env["varlen_attn_signature"] = f"unavailable: {error}"
        for module in ("esm", "transformers", "triton", "flash_attn"):
            try:
                env[module] = getattr(__import__(module), "__version__", "present")
            except Exception:
                env[module] = None
        print("  " + json.dumps(env))

    with section(report, "matmul", json_path):
        report.matmul = matmul_rate(device, sizes.matmul)
        data["matmul_tflops"] = report.matmul
        print(f"  {'fp16' if device.type == 'cuda' else 'fp32'} {sizes.matmul}^3 GEMM: {report.matmul:.1f} TFLOP/s")

    # shared inputs
    reads = synthetic_reads(sizes.reads)
    warm_reads = synthetic_reads(sizes.warmup_reads, seed=9)
    chunks = [c for r in reads for c in chunk_record(r.id, r.sequence, 500)]
    frames = [f for kept in open_frames(chunks) for f in kept]
    frame_proteins = [f.protein for f in frames]
    frame_nucleotides = [f.nucleotide for f in frames]
    proteins = synthetic_proteins(sizes.proteins_ours)
    data["inputs"] = {"reads": len(reads), "frames": len(frames), "frames_per_read": len(frames) / len(reads),
                      "engine_proteins": len(proteins)}
    esm_encoder = dna_encoder = None
    esm_layers = sizes.esm_layers

    with section(report, "ESM-2", json_path):
        import esm as fair_esm_package

        alphabet = fair_esm_package.data.Alphabet.from_architecture("ESM-1b")
        model_name = "ESM-2 3B" if not quick else "ESM-2 tiny"
        fair = None
        try:
            with torch.device(device):
                fair = fair_esm_package.model.esm2.ESM2(num_layers=esm_layers, embed_dim=sizes.esm_dim,
                                                        attention_heads=sizes.esm_heads, alphabet=alphabet)
            fair = fair.eval()
        except Exception as error:
            report.error("ESM-2 fair-esm build", error)
        with torch.device("meta"):
            ours_model = ESM2(esm_layers, sizes.esm_dim, sizes.esm_heads, len(alphabet), alphabet.mask_idx)
        ours_model.to(torch.float16 if device.type == "cuda" else torch.float32)
        ours_model.to_empty(device=device)
        ours_model.lm_head.weight = ours_model.embed_tokens.weight
        if fair is not None:
            ours_model.load_state_dict(fair.state_dict())
        else:  # the model's own init
            with torch.device(device):
                ours_model = ESM2(esm_layers, sizes.esm_dim, sizes.esm_heads, len(alphabet), alphabet.mask_idx)
        esm_encoder = ESM2Encoder(ours_model, alphabet, device, None, **engine_options)
        data["esm_engine"] = _warmed_up(esm_encoder, clock)
        flat, lengths = esm_encoder.tokenize_many(proteins)
        token_lists = np.split(flat, np.cumsum(lengths)[:-1])
        token_lists = [t.tolist() for t in token_lists]

        published_out = None
        if fair is not None:
            subset = token_lists[: sizes.proteins_published]
            fair_esm_published(fair, subset[:8], device, esm_layers)  # warm-up
            seconds, peak, published_out = clock.time(lambda: fair_esm_published(fair, subset, device, esm_layers))
            sub_lengths = lengths[: len(subset)]
            report.row(model_name, "fair-esm fp32 padded 2048 (published)", int(sub_lengths.sum()), len(subset),
                       seconds, peak, esm_flop_per_token(esm_layers, sizes.esm_dim, sub_lengths))
            fair = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        try:
            hf, implementation = hf_esm_model(sizes, device)
            subset = token_lists[: sizes.proteins_hf]
            hf_esm_padded(hf, subset[:64], device)  # warm-up
            seconds, peak, _ = clock.time(lambda: hf_esm_padded(hf, subset, device))
            sub_lengths = lengths[: len(subset)]
            report.row(model_name, f"HF EsmModel fp16 {implementation} padded 32k", int(sub_lengths.sum()),
                       len(subset), seconds, peak, esm_flop_per_token(esm_layers, sizes.esm_dim, sub_lengths))
            hf = None  # free its weights before ours run
        except ImportError as error:
            data["notes"].append(f"HF EsmModel path skipped: {error}")
            print(f"  HF EsmModel path skipped: {error}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        warm = esm_encoder.prepare(proteins[: max(8, len(proteins) // 4)])
        clock.time(lambda: esm_encoder.run(warm)[0].cpu())  # a first pass, untimed
        host_started = time.perf_counter()
        prepared = esm_encoder.prepare(proteins)
        host_seconds = time.perf_counter() - host_started
        runs = []
        for _ in range(2):
            seconds, peak, result = clock.time(lambda: esm_encoder.run(prepared)[0].cpu())
            runs.append((seconds, peak, result))
        seconds, peak, ours_out = min(runs, key=lambda r: r[0])
        report.row(model_name, f"ours packed {esm_encoder.backend}", int(lengths.sum()), len(proteins), seconds, peak,
                   esm_flop_per_token(esm_layers, sizes.esm_dim, lengths),
                   repeat_seconds=[round(r[0], 4) for r in runs], host_prepare_seconds=round(host_seconds, 4),
                   batch_tokens=esm_encoder.batch_tokens, batches=len(prepared.batches))
        if esm_encoder.compile:  # the same engine without torch.compile, for the record
            eager = ESM2Encoder(ours_model, alphabet, device, esm_encoder.batch_tokens,
                                attention=esm_encoder.attention.name, compile=False)
            clock.time(lambda: eager.run(warm)[0].cpu())
            seconds, peak, _ = clock.time(lambda: eager.run(prepared)[0].cpu())
            report.row(model_name, f"ours packed {eager.backend}", int(lengths.sum()), len(proteins), seconds, peak,
                       esm_flop_per_token(esm_layers, sizes.esm_dim, lengths))
        if published_out is not None:
            data["checks"]["esm_ours_vs_fair_esm_fp32"] = _cosines(ours_out[: len(published_out)], published_out)
            print(f"  ours vs fair-esm fp32 on {len(published_out)} proteins: {data['checks']['esm_ours_vs_fair_esm_fp32']}")

    with section(report, "DNABERT-S", json_path):
        config = DNABERTConfig(vocab_size=sizes.dna_vocab, hidden_size=sizes.dna_hidden,
                               num_hidden_layers=sizes.dna_layers, num_attention_heads=sizes.dna_heads,
                               intermediate_size=sizes.dna_intermediate)
        tokenizer = bpe_tokenizer(sizes.dna_vocab, sizes.tokenizer_corpus)
        config = DNABERTConfig(**{**config.__dict__, "vocab_size": tokenizer._tokenizer.get_vocab_size()})
        model = DNABERTModel(config)
        load_published_state_dict(model, _random_state_dict(config, seed=0))
        reference = copy.deepcopy(model).to(device).eval()
        model_name = "DNABERT-S" if not quick else "DNABERT tiny"
        flat, lengths = tokenizer.encode_many(frame_nucleotides)
        token_lists = [t.tolist() for t in np.split(flat, np.cumsum(lengths)[:-1])]
        data["inputs"]["dna_tokens_per_frame"] = float(lengths.mean())
        data["inputs"]["esm_tokens_per_frame"] = float(np.mean([len(p) + 2 for p in frame_proteins]))
        flop = dna_flop_per_token(config.num_hidden_layers, config.hidden_size, config.intermediate_size, lengths)

        subset = token_lists[: sizes.dna_single]
        dna_published_single(reference, subset[:4], device)
        seconds, peak, single_out = clock.time(lambda: dna_published_single(reference, subset, device))
        report.row(model_name, "one per call fp32 (published, our equivalent)", int(lengths[: len(subset)].sum()),
                   len(subset), seconds, peak, flop)

        dna_published_batched(reference, token_lists[:256], device)
        seconds, peak, _ = clock.time(lambda: dna_published_batched(reference, token_lists, device))
        batched = report.row(model_name, "batched 256 padded fp16 autocast (published)", int(lengths.sum()),
                             len(token_lists), seconds, peak, flop)
        reference = None  # free the fp32 copy

        dna_encoder = DNABERTEncoder(model, tokenizer, device, None, **engine_options)
        data["dna_engine"] = _warmed_up(dna_encoder, clock)
        prepared = dna_encoder.prepare(frame_nucleotides)
        clock.time(lambda: dna_encoder.run(prepared)[0].cpu())  # a first pass over this set, untimed
        runs = [clock.time(lambda: dna_encoder.run(prepared)[0].cpu()) for _ in range(3)]
        seconds, peak, ours_out = min(runs, key=lambda r: r[0])
        ours = report.row(model_name, f"ours packed {dna_encoder.backend}", int(lengths.sum()), len(token_lists),
                          seconds, peak, flop, repeat_seconds=[round(r[0], 4) for r in runs],
                          batch_tokens=dna_encoder.batch_tokens, batches=len(prepared.batches))
        if dna_encoder.compile:
            eager = DNABERTEncoder(model, tokenizer, device, dna_encoder.batch_tokens,
                                   attention=dna_encoder.attention.name, compile=False)
            clock.time(lambda: eager.run(prepared)[0].cpu())
            seconds, peak, _ = clock.time(lambda: eager.run(prepared)[0].cpu())
            report.row(model_name, f"ours packed {eager.backend}", int(lengths.sum()), len(token_lists),
                       seconds, peak, flop)
        data["checks"]["dna_ours_vs_fp32_one_per_call"] = _cosines(ours_out[: len(single_out)], single_out)
        print(f"  ours vs fp32 one-per-call on {len(single_out)} frames: {data['checks']['dna_ours_vs_fp32_one_per_call']}")
        data["targets"]["dna_vs_published_batched"] = ours["tokens_per_s"] / batched["tokens_per_s"]

    with section(report, "same frames: DNABERT-S vs ESM-2, and ESM-2 alone", json_path):
        if esm_encoder is None or dna_encoder is None:
            raise RuntimeError("an encoder failed to build")
        esm_encoder.embed(frame_proteins[:64])
        dna_seconds, _, _ = clock.time(lambda: dna_encoder.embed(frame_nucleotides))
        esm_seconds, esm_peak, _ = clock.time(lambda: esm_encoder.embed(frame_proteins))
        same = {"frames": len(frames), "dna_seconds": dna_seconds, "esm_seconds": esm_seconds,
                "dna_ms_per_frame": 1e3 * dna_seconds / len(frames), "esm_ms_per_frame": 1e3 * esm_seconds / len(frames),
                "dna_share_of_esm_time": dna_seconds / esm_seconds, "esm_only_frames_per_s": len(frames) / esm_seconds,
                "esm_only_peak_gib": esm_peak}
        data["pipeline"].update(same)
        print(f"  {len(frames)} frames: DNABERT-S {same['dna_ms_per_frame']:.3f} ms/frame, ESM-2 "
              f"{same['esm_ms_per_frame']:.3f} ms/frame (DNABERT-S = {100 * same['dna_share_of_esm_time']:.1f}% "
              f"of ESM-2); ESM-2 alone {same['esm_only_frames_per_s']:,.0f} frames/s")

    with section(report, "pipeline", json_path):
        classifier_model = MLPClassifier(dna_encoder.dim + esm_encoder.dim, 512).to(device).eval()
        classifier = Classifier(classifier_model, 500, "random")
        variants = [("default", {}), ("group_reads=2048", {"group_reads": 2048}),
                    ("not pipelined", {"pipelined": False})]
        for label, options in variants:
            predictor = Predictor(dna_encoder, esm_encoder, classifier, 500, **options)
            for _ in predictor.predict(warm_reads):
                pass

            def whole() -> int:
                count = 0
                for result in predictor.predict(reads):
                    count += len(result.frames)
                return count

            passes = []
            for _ in range(3 if label == "default" else 2):
                predictor.timings = dict.fromkeys(predictor.timings, 0.0)
                with GcTimer() as gc_timer:
                    seconds, peak, counted = clock.time(whole)
                timings = {k: round(v, 3) for k, v in predictor.timings.items()}
                timings.update(gc_seconds=round(gc_timer.seconds, 3), gc_full=gc_timer.full)
                passes.append((seconds, peak, counted, timings))
            seconds, peak, counted, timings = min(passes, key=lambda p: p[0])
            frames_per_s = counted / seconds
            ratio = frames_per_s / data["pipeline"]["esm_only_frames_per_s"]
            result = {"reads": len(reads), "frames": counted, "seconds": seconds,
                      "pass_seconds": [round(p[0], 3) for p in passes], "frames_per_s": frames_per_s,
                      "reads_per_s": len(reads) / seconds, "peak_gib": peak, "group_reads": predictor.group_reads,
                      "pipelined": predictor.pipelined, "host_seconds": timings,
                      "host_seconds_per_pass": [p[3] for p in passes], "vs_esm_only": ratio}
            data["pipeline"].setdefault("variants", {})[label] = result
            print(f"  pipeline {label}: {counted} frames of {len(reads)} reads in {seconds:.2f} s "
                  f"(passes {result['pass_seconds']}) = {frames_per_s:,.0f} frames/s ({100 * ratio:.1f}% of ESM-2 "
                  f"alone), peak {peak if peak is None else round(peak, 1)} GiB, host {result['host_seconds']}")
            if label == "default":
                data["pipeline"].update({
                    "pipeline_frames": counted, "pipeline_seconds": seconds, "pipeline_frames_per_s": frames_per_s,
                    "pipeline_reads_per_s": len(reads) / seconds, "pipeline_peak_gib": peak,
                    "group_reads": predictor.group_reads, "engine": predictor.engine, "pipeline_vs_esm_only": ratio,
                })

    if device.type == "cuda":
        with section(report, "profile", json_path):
            data["profile"]["esm"] = _profile(lambda: esm_encoder.run(esm_encoder.prepare(proteins[:400]))[0].cpu())
            data["profile"]["dna"] = _profile(lambda: dna_encoder.run(dna_encoder.prepare(frame_nucleotides[:2000]))[0].cpu())
            for name, rows in data["profile"].items():
                print(f"  {name}: top kernels by GPU time")
                for row in rows[:12]:
                    print(f"    {row['share']:6.1%} {row['ms']:9.2f} ms  {row['calls']:6d}x  {row['name'][:90]}")

    _targets(report)
    _print_table(report)
    report.write(json_path)
    return data


def _warmed_up(encoder, clock: Clock) -> dict:
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
