"""Attention over packed batches: one interface, several backends, chosen once at load.

Both encoders run attention on packed rows, sequence after sequence, with `cu_seqlens`
marking where each starts (see core.packing). A backend computes softmax attention inside
each sequence, never across two; DNABERT-S adds the ALiBi bias -slope_h * |i - j|.

| backend | plain (ESM-2) | ALiBi (DNABERT-S) | where |
| --- | --- | --- | --- |
| `flash_attn` | flash_attn_varlen_func | same, alibi_slopes | CUDA, when flash-attn is installed |
| `varlen` | torch.nn.attention.varlen.varlen_attn | - | CUDA, torch >= 2.10 |
| `flex` | - | FlexAttention, block-sparse document mask + ALiBi score_mod, compiled once per token bucket | CUDA |
| `sdpa_padded` | padded SDPA with a key mask | padded SDPA with bias + key mask | anywhere |
| `per_sequence` | one SDPA per sequence | same, bias matrix | the CPU reference |

`select(...)` picks the first that imports and passes a small numerical probe on the device,
and returns an `Attention` whose `name` the job logs. Nothing here reads a GPU value back
to the host: the host offsets travel in `Segments.bounds`.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from core.packing import segment_ids

# FlexAttention's sparse block, and the kernel's tiles: padded token counts are multiples of
# it. DNABERT-S's sequences are about 105 tokens: 64-row blocks skip more of the keys outside
# each query's sequence than 128-row ones (the default), 5-7% faster over the whole model on an
# H200 (docs/PERFORMANCE.md).
FLEX_BLOCK = 64
FLEX_KERNEL_OPTIONS = {"BLOCK_M": FLEX_BLOCK, "BLOCK_N": FLEX_BLOCK}
FLEX_MIN_BUCKET = 4096  # smallest padded token count: fewer distinct shapes, fewer compiles
PLAIN_ORDER = ("flash_attn", "varlen", "sdpa_padded")
ALIBI_ORDER = ("flash_attn", "flex", "sdpa_padded")
ALL_BACKENDS = ("flash_attn", "varlen", "flex", "sdpa_padded", "per_sequence")


@dataclass
class Segments:
    """Where each packed sequence lies; built once per batch and shared by every layer.

    Rows bounds[-1] .. total (if any) are padding that belongs to no sequence; backends
    return zeros there.
    """

    cu_seqlens: Tensor  # int32 [n + 1] on the compute device
    bounds: list[int]  # the same offsets as host ints (no device sync to read them)
    max_seqlen: int
    total: int  # rows including padding
    cache: dict = field(default_factory=dict)  # backend-specific layouts, built on first use

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    @property
    def real(self) -> int:
        return self.bounds[-1]

    def owner(self) -> Tensor:
        """Sequence number of every real row, int64 [real]."""
        if "owner" not in self.cache:
            self.cache["owner"] = segment_ids(self.cu_seqlens, self.real)
        return self.cache["owner"]

    def positions(self) -> Tensor:
        """Position of every real row inside its sequence, int64 [real]."""
        if "positions" not in self.cache:
            rows = torch.arange(self.real, device=self.cu_seqlens.device)
            self.cache["positions"] = rows - self.cu_seqlens.to(torch.int64)[:-1][self.owner()]
        return self.cache["positions"]


def flex_bucket(total: int, minimum: int = FLEX_MIN_BUCKET) -> int:
    """Padded token count for FlexAttention: the next power of two >= minimum (itself a
    multiple of FLEX_BLOCK), so that few shapes, and few compilations, ever occur."""
    bucket = minimum
    while bucket < total:
        bucket *= 2
    return bucket


AttentionFn = Callable[[Tensor, Tensor, Tensor, Segments, "float | None", "Tensor | None"], Tensor]


@dataclass
class Attention:
    """A chosen backend. Called as attention(q, k, v, segments, scale, slopes).

    q, k, v: [total, heads, head_dim], or [heads, total, head_dim] when `heads_first`
    (FlexAttention's layout, so the projection writes it directly); the output has the
    same layout. scale None means head_dim ** -0.5. slopes: float32 [heads] for ALiBi.
    `pads_to` maps a packed token count to the row count the backend wants (the encoder
    pads with a dummy sequence); identity for all but flex.
    """

    name: str
    alibi: bool
    fn: AttentionFn
    heads_first: bool = False
    note: str = ""
    min_bucket: int = FLEX_MIN_BUCKET  # flex only: smallest padded row count

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, segments: Segments,
                 scale: float | None = None, slopes: Tensor | None = None) -> Tensor:
        return self.fn(q, k, v, segments, scale, slopes)

    def pads_to(self, total: int) -> int:
        return flex_bucket(total, self.min_bucket) if self.name == "flex" else total


# --- the backends ---------------------------------------------------------------------------

def alibi_bias(slopes: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """The [heads, length, length] additive attention bias -slope_h * |i - j| (DNABERT-S's
    ALiBi), computed in the slopes' float32 and given in `dtype`."""
    positions = torch.arange(length, device=slopes.device)
    distance = (positions[None, :] - positions[:, None]).abs()
    return (slopes[:, None, None] * -distance).to(dtype)


def per_sequence(q: Tensor, k: Tensor, v: Tensor, segments: Segments,
                 scale: float | None = None, slopes: Tensor | None = None) -> Tensor:
    """One dense SDPA per sequence: the reference (and the CPU path)."""
    out = torch.zeros_like(q) if segments.total > segments.real else torch.empty_like(q)
    bias = None if slopes is None else alibi_bias(slopes, segments.max_seqlen, q.dtype)
    for start, end in zip(segments.bounds[:-1], segments.bounds[1:]):
        length = end - start
        mask = None if bias is None else bias[:, :length, :length]
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
            attn_mask=mask, scale=scale,
        ).transpose(0, 1)
    return out


def _padded_layout(segments: Segments) -> tuple[Tensor, Tensor, Tensor]:
    """(gather rows [n, L], key_valid [n, L], slot of each real row in the n*L grid)."""
    if "padded" not in segments.cache:
        length = segments.max_seqlen
        cu = segments.cu_seqlens.to(torch.int64)
        columns = torch.arange(length, device=cu.device)
        lengths = cu[1:] - cu[:-1]
        valid = columns[None, :] < lengths[:, None]
        rows = (cu[:-1, None] + columns[None, :]).clamp(max=max(segments.real - 1, 0))
        slots = segments.owner() * length + segments.positions()
        segments.cache["padded"] = (rows, valid, slots)
    return segments.cache["padded"]


def sdpa_padded(q: Tensor, k: Tensor, v: Tensor, segments: Segments,
                scale: float | None = None, slopes: Tensor | None = None) -> Tensor:
    """Gather into [n, heads, L, d], one SDPA with a key mask (plus ALiBi), scatter back."""
    rows, valid, slots = _padded_layout(segments)
    n, length = rows.shape
    heads, dim = q.shape[1], q.shape[2]
    q_pad, k_pad, v_pad = (t[rows].transpose(1, 2) for t in (q, k, v))  # [n, H, L, d]
    if slopes is None:
        mask = valid[:, None, None, :]
    else:
        bias = alibi_bias(slopes, length, q.dtype)[None]
        mask = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
    attended = F.scaled_dot_product_attention(q_pad, k_pad, v_pad, attn_mask=mask, scale=scale)
    flat = attended.transpose(1, 2).reshape(n * length, heads, dim)
    if segments.total == segments.real:
        return flat[slots]
    out = q.new_zeros(q.shape)
    out[: segments.real] = flat[slots]
    return out


def _varlen_function() -> Callable:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def varlen(q: Tensor, k: Tensor, v: Tensor, segments: Segments,
           scale: float | None = None, slopes: Tensor | None = None) -> Tensor:
    """torch.nn.attention.varlen.varlen_attn (FlashAttention-2 kernels in PyTorch)."""
    if slopes is not None:
        raise ValueError("varlen_attn has no ALiBi bias")
    function = _varlen_function()
    default = q.shape[-1] ** -0.5
    kwargs = {}
    if scale is not None and scale != default:
        if "scale" in _parameters(function):
            kwargs["scale"] = scale
        else:  # older signature: fold the ratio into q (exact when it is a power of two)
            q = q * (scale / default)
    cu = _with_padding(segments)
    longest = max(segments.max_seqlen, segments.total - segments.real)
    return function(q, k, v, cu, cu, longest, longest, **kwargs)


def flash_attn(q: Tensor, k: Tensor, v: Tensor, segments: Segments,
               scale: float | None = None, slopes: Tensor | None = None) -> Tensor:
    """flash_attn.flash_attn_varlen_func, with ALiBi slopes when given."""
    from flash_attn import flash_attn_varlen_func

    cu = _with_padding(segments)
    longest = max(segments.max_seqlen, segments.total - segments.real)
    return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=0.0,
                                  softmax_scale=scale, causal=False,
                                  alibi_slopes=None if slopes is None else slopes.float())


def _with_padding(segments: Segments) -> Tensor:
    """cu_seqlens with the padding rows (if any) as one more sequence."""
    if segments.total == segments.real:
        return segments.cu_seqlens
    if "cu_padded" not in segments.cache:
        tail = torch.full((1,), segments.total, dtype=torch.int32, device=segments.cu_seqlens.device)
        segments.cache["cu_padded"] = torch.cat([segments.cu_seqlens, tail])
    return segments.cache["cu_padded"]


def _parameters(function: Callable) -> set[str]:
    try:
        return set(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return set()


# FlexAttention: rows are padded to a bucket (multiple of FLEX_BLOCK); the padding is one more
# document. The block mask lists, for each query block of FLEX_BLOCK rows, the contiguous
# range of key blocks that its documents cover; the score_mod adds ALiBi and masks other
# documents.

def _flex_layout(segments: Segments):
    if "flex" in segments.cache:
        return segments.cache["flex"]
    from torch.nn.attention.flex_attention import BlockMask

    total, real, device = segments.total, segments.real, segments.cu_seqlens.device
    if total % FLEX_BLOCK:
        raise ValueError(f"flex needs rows padded to a multiple of {FLEX_BLOCK}, got {total}")
    doc = torch.full((total,), segments.count, dtype=torch.int32, device=device)
    doc[:real] = segments.owner().to(torch.int32)
    cu = segments.cu_seqlens.to(torch.int64)
    edge = torch.full((1,), total, dtype=torch.int64, device=device)
    starts = torch.cat([cu[:-1], cu[-1:]])  # the padding document starts where the real ones end
    ends = torch.cat([cu[1:], edge])
    blocks = total // FLEX_BLOCK
    first_row = torch.arange(blocks, device=device) * FLEX_BLOCK
    first_doc = doc[first_row].to(torch.int64)
    last_doc = doc[first_row + FLEX_BLOCK - 1].to(torch.int64)
    low = starts[first_doc] // FLEX_BLOCK
    high = (ends[last_doc] - 1) // FLEX_BLOCK
    columns = torch.arange(blocks, device=device)
    indices = torch.minimum(low[:, None] + columns[None, :], high[:, None]).to(torch.int32)
    counts = (high - low + 1).to(torch.int32)
    block_mask = BlockMask.from_kv_blocks(counts[None, None], indices[None, None],
                                          BLOCK_SIZE=FLEX_BLOCK, seq_lengths=(total, total))
    segments.cache["flex"] = (doc, block_mask)
    return segments.cache["flex"]


def _flex_alibi(q: Tensor, k: Tensor, v: Tensor, doc: Tensor, slopes: Tensor, block_mask,
                scale: float):
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, batch, head, q_idx, kv_idx):
        biased = score - slopes[head] * (q_idx - kv_idx).abs()
        return torch.where(doc[q_idx] == doc[kv_idx], biased, -float("inf"))

    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          kernel_options=FLEX_KERNEL_OPTIONS)


_FLEX_COMPILED: dict[str, Callable] = {}


def _flex_runner(compiled: bool) -> Callable:
    key = "compiled" if compiled else "eager"
    if key not in _FLEX_COMPILED:
        _FLEX_COMPILED[key] = torch.compile(_flex_alibi, dynamic=False, fullgraph=True) if compiled else _flex_alibi
    return _FLEX_COMPILED[key]


def flex(q: Tensor, k: Tensor, v: Tensor, segments: Segments,
         scale: float | None = None, slopes: Tensor | None = None) -> Tensor:
    """FlexAttention over [heads, total, d] (heads first), document mask + ALiBi."""
    if slopes is None:
        slopes = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    doc, block_mask = _flex_layout(segments)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    runner = _flex_runner(compiled=q.is_cuda)
    with warnings.catch_warnings():  # off CUDA it runs uncompiled on purpose (tests, --quick)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = runner(q[None], k[None], v[None], doc, slopes.float(), block_mask, scale)
    return out[0]


_FUNCTIONS: dict[str, AttentionFn] = {
    "flash_attn": flash_attn,
    "varlen": varlen,
    "flex": flex,
    "sdpa_padded": sdpa_padded,
    "per_sequence": per_sequence,
}


def make(name: str, alibi: bool, note: str = "", device: torch.device | None = None) -> Attention:
    """The backend `name` without any check: `select` after its checks, and tests and
    benchmarks forcing one.

    Off CUDA, flex runs uncompiled (dense scores): its padding bucket starts small there."""
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(ALL_BACKENDS)}")
    if alibi and name == "varlen":
        raise ValueError("varlen_attn has no ALiBi bias: not usable for DNABERT-S")
    if not alibi and name == "flex":
        raise ValueError("the flex backend is written for ALiBi (DNABERT-S)")
    on_gpu = device is None or device.type == "cuda"
    return Attention(name, alibi, _FUNCTIONS[name], heads_first=name == "flex", note=note,
                     min_bucket=FLEX_MIN_BUCKET if on_gpu else FLEX_BLOCK)


def importable(name: str) -> bool:
    try:
        if name == "flash_attn":
            from flash_attn import flash_attn_varlen_func  # noqa: F401
        elif name == "varlen":
            _varlen_function()
        elif name == "flex":
            from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except Exception:  # an extension can fail to import in many ways (missing CUDA symbols, ...)
        return False
    return True


def probe(attention: Attention, device: torch.device, dtype: torch.dtype, heads: int = 4, dim: int = 64) -> float:
    """Max abs difference between `attention` and per-sequence SDPA on small random input
    with the model's head count and size (so flex compiles its smallest bucket for real).

    Raises when the backend cannot run or disagrees.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    lengths = [37, 128, 1, 90]
    real = sum(lengths)
    total = attention.pads_to(real)
    q, k, v = (torch.randn(total, heads, dim, generator=generator).to(device, dtype) for _ in range(3))
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    segments = Segments(torch.tensor(bounds, dtype=torch.int32, device=device), bounds, max(lengths), total)
    slopes = 2.0 ** -torch.arange(1, heads + 1, device=device, dtype=torch.float32) if attention.alibi else None
    scale = 0.125
    args = (q, k, v) if not attention.heads_first else tuple(t.transpose(0, 1).contiguous() for t in (q, k, v))
    out = attention(*args, segments, scale, slopes)
    if attention.heads_first:
        out = out.transpose(0, 1)
    reference_segments = Segments(segments.cu_seqlens, bounds, max(lengths), real)
    expected = per_sequence(q[:real].float(), k[:real].float(), v[:real].float(), reference_segments, scale, slopes)
    error = (out[:real].float() - expected).abs().max().item()
    if not math.isfinite(error) or error > 2e-2:
        raise RuntimeError(f"attention backend {attention.name} disagrees with the reference by {error:.3g}")
    return error


def select(alibi: bool, device: torch.device, dtype: torch.dtype, requested: str | None = None,
           heads: int = 4, head_dim: int = 64) -> Attention:
    """The backend to use on `device`, chosen once: `requested` if given, else the first of
    flash_attn, varlen (plain) or flex (ALiBi), sdpa_padded that imports and passes `probe`
    on CUDA; per_sequence on the CPU (the reference arithmetic). The `note` says why others
    were passed over."""
    if requested:
        return make(requested, alibi, device=device)
    if device.type != "cuda":
        return make("per_sequence", alibi, device=device)
    skipped = []
    for name in ALIBI_ORDER if alibi else PLAIN_ORDER:
        if not importable(name):
            skipped.append(f"{name}: not importable")
            continue
        candidate = make(name, alibi, device=device)
        try:
            probe(candidate, device, dtype, heads, head_dim)
        except Exception as error:  # any failure means: use the next backend
            skipped.append(f"{name}: {type(error).__name__}: {str(error)[:200]}")
            continue
        candidate.note = "; ".join(skipped)
        return candidate
    return make("per_sequence", alibi, note="; ".join(skipped))
