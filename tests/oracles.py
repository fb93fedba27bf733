"""Straightforward versions of what core/ computes fast, for the tests to compare against.

`pack` builds batches one tensor per sequence (core.packing.pack_flat builds the same ones
with NumPy gathers). fair-esm itself is the ESM-2 oracle, tests/test_dnabert.py's float64
`naive_embedding` the DNABERT-S one on the CPU, and the published one-sequence-per-call loop
over our float32 model (benchmarks/bench.py `dna_published_single`) the GPU tests' one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from core.packing import PackedBatch, _first_fit


def pack(token_lists: Sequence[Sequence[int]] | Sequence[Tensor], budget_tokens: int) -> list[PackedBatch]:
    """Pack sequences into batches of at most `budget_tokens` tokens, first-fit-decreasing:
    longest first (ties in input order), each into the first batch with room for it."""
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be positive, got {budget_tokens}")
    lengths = [len(tokens) for tokens in token_lists]
    if any(length == 0 for length in lengths):
        raise ValueError("cannot pack an empty sequence")
    longest_first = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins = _first_fit([lengths[i] for i in longest_first], budget_tokens)
    return [_build_batch(token_lists, [longest_first[j] for j in members]) for members in bins]


def _build_batch(token_lists: Sequence[Sequence[int]] | Sequence[Tensor], order: list[int]) -> PackedBatch:
    pieces = [torch.as_tensor(token_lists[i], dtype=torch.int64).reshape(-1) for i in order]
    lengths = torch.tensor([len(piece) for piece in pieces], dtype=torch.int64)
    cu_seqlens = torch.zeros(len(pieces) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    starts = cu_seqlens[:-1].to(torch.int64).repeat_interleave(lengths)
    return PackedBatch(
        tokens=torch.cat(pieces),
        cu_seqlens=cu_seqlens,
        positions=torch.arange(len(starts), dtype=torch.int64) - starts,
        max_seqlen=int(lengths.max()),
        order=order,
    )
