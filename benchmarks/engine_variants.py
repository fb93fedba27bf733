"""Where the encoders' time goes, and what candidate changes would buy (issue 14), on a GPU.

Not a test: it prints figures, recorded with their command in docs/PERFORMANCE.md.

    python benchmarks/engine_variants.py            # full-size random models, one CUDA GPU
    python benchmarks/engine_variants.py dna        # DNABERT-S only (or: esm)

On the bench's inputs (benchmarks/bench.py: 4,000 proteins for ESM-2 3B, the open frames of
3,000 synthetic 500-bp reads for DNABERT-S), for each encoder:

- tokens/s of the landed engine (best of 2 passes) and the GPU's busy share: kernel time
  (torch.profiler) over wall time; a share near 1 means the host is not what limits it;
- ESM-2: the same batch launched eagerly and replayed as a CUDA graph: what one graph per
  batch would save on the host side;
- variants of the compiled pieces (swapped in for the module's own): the engine before
  issue 14 (q/k/v copied out of the projection), DNABERT-S's FlexAttention with other block
  sizes and kernel tiles (128-row blocks were the engine before), and a candidate not
  adopted (fc1's bias and GELU in cuBLASLt's epilogue, whose GELU is the tanh approximation,
  not the exact one ESM-2 was trained with), timed the same way and checked against the
  landed engine's embeddings (min cosine, max abs difference) and, for ESM-2, against
  fair-esm in float32;
- DNABERT-S with half and twice the token budget per batch.
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as B  # noqa: E402
from core import attention as attention_module  # noqa: E402
from core import dnabert as dnabert_module  # noqa: E402
from core import esm2 as esm_module  # noqa: E402
from core.engine import Compiled  # noqa: E402


def timed(work, passes: int = 2) -> float:
    best = float("inf")
    for _ in range(passes):
        torch.cuda.synchronize()
        started = time.perf_counter()
        work()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def busy_share(work) -> float:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()
                    if getattr(e, "device_type", None) == DeviceType.CUDA)
    return kernel_us / 1e6 / wall


def graph_vs_eager(pooled, batch) -> dict:
    """One batch: seconds per call launched from Python against a captured CUDA graph."""
    with torch.inference_mode():
        for _ in range(2):
            pooled(batch)
        launched = timed(lambda: pooled(batch), 3)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                pooled(batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = pooled(batch)
        replayed = timed(graph.replay, 3)
        same = (out - pooled(batch)).abs().max().item()
    return {"tokens": batch.total, "launched_s": round(launched, 5), "graph_s": round(replayed, 5),
            "graph_saves": round(1 - replayed / launched, 4), "graph_max_diff": same}


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    cos = F.cosine_similarity(reference.double(), other.double(), dim=1)
    return {"min_cos": round(cos.min().item(), 7), "max_abs": float((reference - other).abs().max())}


def report(name: str, tokens: int, seconds: float, extra: dict | None = None) -> None:
    print(f"  {name}: {tokens / seconds:,.0f} tokens/s ({seconds:.3f} s) {extra or ''}", flush=True)


# --- ESM-2 variants ---------------------------------------------------------------------------

def _post_tanh_epilogue(x, attended, w_o, b_o, ln_w, ln_b, w_1, b_1, w_2, b_2, eps):
    """fc1 bias + GELU in cuBLASLt's epilogue (its GELU is the tanh approximation)."""
    total, width = x.shape
    x = x + F.linear(attended.reshape(total, width), w_o, b_o)
    up = torch._addmm_activation(b_1, F.layer_norm(x, (width,), ln_w, ln_b, eps), w_1.t(), use_gelu=True)
    return torch.addmm(x + b_2, up, w_2.t())


def _pre_v_copied(x, ln_w, ln_b, w_q, w_k, w_v, b_q, b_k, b_v, cos, sin, heads, eps, q_scale):
    """The engine before issue 14: v copied out of the q/k/v GEMM's output."""
    total, width = x.shape
    h = F.layer_norm(x, (width,), ln_w, ln_b, eps)
    qkv = F.linear(h, torch.cat((w_q, w_k, w_v)), torch.cat((b_q, b_k, b_v))).view(total, 3, heads, width // heads)
    q = esm_module._rotate(qkv[:, 0].float() * q_scale, cos, sin).to(x.dtype)
    k = esm_module._rotate(qkv[:, 1].float(), cos, sin).to(x.dtype)
    return q, k, qkv[:, 2].contiguous()


def esm_section(device: torch.device) -> None:
    import argparse

    import esm

    sizes = B.FULL
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device(device):
        fair = esm.model.esm2.ESM2(num_layers=sizes.esm_layers, embed_dim=sizes.esm_dim,
                                   attention_heads=sizes.esm_heads, alphabet=alphabet).eval()
    config = argparse.Namespace(encoder_layers=sizes.esm_layers, encoder_embed_dim=sizes.esm_dim,
                                encoder_attention_heads=sizes.esm_heads, token_dropout=True)
    model = esm_module.model_from_checkpoint({"model": fair.state_dict(), "cfg": {"model": config}}, "random",
                                             device, torch.float16)
    encoder = esm_module.ESM2Encoder(model, alphabet, device, None)
    proteins = B.synthetic_proteins(sizes.proteins_ours)
    started = time.perf_counter()
    encoder.warm_up()
    print(f"  ESM-2 warm-up {time.perf_counter() - started:.1f} s, backend {encoder.backend}, "
          f"batch_tokens {encoder.batch_tokens}", flush=True)
    prepared = encoder.prepare(proteins)
    tokens = sum(b.total for b in prepared.batches)
    encoder.run(prepared)[0].cpu()
    seconds = timed(lambda: encoder.run(prepared)[0].cpu())
    baseline = encoder.run(prepared)[0].cpu()
    report("ESM-2 landed", tokens, seconds, {"busy": round(busy_share(lambda: encoder.run(prepared)[0].cpu()), 3)})
    biggest = max(prepared.batches, key=lambda b: b.total).to(device)
    smallest = min(prepared.batches, key=lambda b: b.total).to(device)
    for batch in (biggest, smallest):
        try:
            print(f"  ESM-2 one batch launched vs CUDA graph: {graph_vs_eager(encoder._pooled, batch)}", flush=True)
        except Exception:
            print("  ESM-2 CUDA graph failed:\n" + traceback.format_exc(limit=3), flush=True)
    original_pre, original_post = esm_module.PRE_ATTENTION, esm_module.POST_ATTENTION
    variants = {
        "v copied (before issue 14)": (Compiled(_pre_v_copied, dynamic_args=(0, 9, 10)), original_post),
        "fc1 GELU in cuBLASLt epilogue (tanh approximation)": (original_pre,
                                                               Compiled(_post_tanh_epilogue, dynamic_args=(0, 1))),
    }
    for name, (pre, post) in variants.items():
        try:
            torch._dynamo.reset()
            esm_module.PRE_ATTENTION, esm_module.POST_ATTENTION = pre, post
            encoder.warm_up()
            encoder.run(prepared)[0].cpu()
            seconds = timed(lambda: encoder.run(prepared)[0].cpu())
            report(f"ESM-2 {name}", tokens, seconds, compare(baseline, encoder.run(prepared)[0].cpu()))
        except Exception:
            print(f"  ESM-2 {name} failed:\n" + traceback.format_exc(limit=4), flush=True)
        finally:
            esm_module.PRE_ATTENTION, esm_module.POST_ATTENTION = original_pre, original_post
    # fair-esm fp32 (the published path) on a few proteins: the tanh variant's numerics
    try:
        few = proteins[:64]
        flat, lengths = encoder.tokenize_many(few)
        token_lists = [t.tolist() for t in B.np.split(flat, B.np.cumsum(lengths)[:-1])]
        expected = B.fair_esm_published(fair, token_lists, device, sizes.esm_layers).cpu()
        print(f"  ESM-2 landed fp16 vs fair-esm fp32 on 64: {compare(expected, baseline[:64])}")
        esm_module.POST_ATTENTION = Compiled(_post_tanh_epilogue, dynamic_args=(0, 1))
        print(f"  ESM-2 tanh epilogue fp16 vs fair-esm fp32 on 64: {compare(expected, encoder.embed(few))}")
    except Exception:
        print("  ESM-2 oracle failed:\n" + traceback.format_exc(limit=4), flush=True)
    finally:
        esm_module.POST_ATTENTION = original_post


# --- DNABERT-S variants -----------------------------------------------------------------------

def _project_copied(x, w_qkv, b_qkv, heads, heads_first):
    """The engine before issue 14: q, k, v copied out of the GEMM's output."""
    total, width = x.shape
    qkv = F.linear(x, w_qkv, b_qkv).view(total, 3, heads, width // heads)
    if heads_first:
        return tuple(qkv[:, i].transpose(0, 1).contiguous() for i in range(3))
    return tuple(qkv[:, i].contiguous() for i in range(3))


class flex_blocks:
    """FlexAttention with another sparse block size and kernel tiles than the landed ones
    (core.attention.FLEX_BLOCK, FLEX_KERNEL_OPTIONS) for the duration of a `with`; the
    compiler starts afresh on entry and exit."""

    def __init__(self, block: int, options: dict) -> None:
        self.block, self.options = block, options

    def __enter__(self) -> None:
        self.saved = attention_module.FLEX_BLOCK, attention_module.FLEX_KERNEL_OPTIONS
        torch._dynamo.reset()
        attention_module._FLEX_COMPILED.clear()
        attention_module.FLEX_BLOCK, attention_module.FLEX_KERNEL_OPTIONS = self.block, self.options

    def __exit__(self, *exc) -> None:
        torch._dynamo.reset()
        attention_module._FLEX_COMPILED.clear()
        attention_module.FLEX_BLOCK, attention_module.FLEX_KERNEL_OPTIONS = self.saved


def dna_section(device: torch.device) -> None:
    sizes = B.FULL
    tokenizer, vocab = B.bpe_tokenizer(sizes.dna_vocab, sizes.tokenizer_corpus)
    config = dnabert_module.DNABERTConfig(vocab_size=vocab, hidden_size=sizes.dna_hidden,
                                          num_hidden_layers=sizes.dna_layers, num_attention_heads=sizes.dna_heads,
                                          intermediate_size=sizes.dna_intermediate)
    model = B.dnabert_model(config, device, torch.float16)
    encoder = dnabert_module.DNABERTEncoder(model, tokenizer, device, None)
    started = time.perf_counter()
    encoder.warm_up()
    print(f"  DNABERT-S warm-up {time.perf_counter() - started:.1f} s, backend {encoder.backend}, "
          f"batch_tokens {encoder.batch_tokens}", flush=True)
    reads = B.synthetic_reads(sizes.reads)
    chunks = [c for r in reads for c in B.chunk_record(r.id, r.sequence, 500)]
    nucleotides = [f.nucleotide for kept in B.open_frames(chunks) for f in kept]
    prepared = encoder.prepare(nucleotides)
    tokens = sum(b.total for b in prepared.batches)
    encoder.run(prepared)[0].cpu()
    seconds = timed(lambda: encoder.run(prepared)[0].cpu(), 3)
    baseline = encoder.run(prepared)[0].cpu()
    report("DNABERT-S landed", tokens, seconds,
           {"busy": round(busy_share(lambda: encoder.run(prepared)[0].cpu()), 3), "batches": len(prepared.batches)})
    variants = [("FlexAttention's default 128-row blocks and tiles (before)", flex_blocks(128, {}), None),
                ("q/k/v copied, 128-row blocks (before issue 14)", flex_blocks(128, {}),
                 Compiled(_project_copied, dynamic_args=(0,)))]
    variants += [(f"{block}-row blocks, kernel {options}", flex_blocks(block, options), None) for block, options in (
        (64, {"BLOCK_M": 64, "BLOCK_N": 32}), (32, {"BLOCK_M": 32, "BLOCK_N": 32}), (128, {"BLOCK_M": 64, "BLOCK_N": 64}))]
    original = dnabert_module.PROJECT
    for name, blocks, project in variants:
        try:
            with blocks:
                dnabert_module.PROJECT = project or original
                variant = dnabert_module.DNABERTEncoder(model, tokenizer, device, encoder.batch_tokens)
                variant.warm_up()
                variant.run(prepared)[0].cpu()
                seconds = timed(lambda: variant.run(prepared)[0].cpu(), 3)
                report(f"DNABERT-S {name}", tokens, seconds, compare(baseline, variant.run(prepared)[0].cpu()))
        except Exception:
            print(f"  DNABERT-S {name} failed:\n" + traceback.format_exc(limit=4), flush=True)
        finally:
            dnabert_module.PROJECT = original
    seconds = timed(lambda: encoder.run(prepared)[0].cpu(), 3)
    report("DNABERT-S landed, again", tokens, seconds)
    for budget in (encoder.batch_tokens // 2, encoder.batch_tokens * 2):
        try:
            torch._dynamo.reset()
            bigger = dnabert_module.DNABERTEncoder(model, tokenizer, device, budget)
            bigger.warm_up()
            again = bigger.prepare(nucleotides)
            bigger.run(again)[0].cpu()
            seconds = timed(lambda: bigger.run(again)[0].cpu(), 3)
            report(f"DNABERT-S batch_tokens {budget}", tokens, seconds, {"batches": len(again.batches)})
        except Exception:
            print("  DNABERT-S other budget failed:\n" + traceback.format_exc(limit=4), flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("engine_variants: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"engine variants on {torch.cuda.get_device_name()} (torch {torch.__version__})", flush=True)
    sections = {"dna": ("DNABERT-S", dna_section), "esm": ("ESM-2", esm_section)}
    chosen = set(sys.argv[1:]) or set(sections)
    for name, section in (sections[key] for key in sections if key in chosen):
        print(f"\n== {name}", flush=True)
        try:
            section(device)
        except Exception:
            print(traceback.format_exc(), flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
