"""Sequence packing: many variable-length sequences in one flat batch, without padding.

Encoders run on a `PackedBatch`: every token of every sequence in one 1-D tensor, with
`cu_seqlens` marking where each sequence starts and ends (the layout varlen attention
kernels take). `pack_flat` fills batches up to a token budget, first-fit-decreasing, so
that batches are nearly full whatever the mix of lengths; `segment_mean` pools the
encoder's output back to one vector per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MIN_BATCH_TOKENS = 1024  # the smallest budget derived from free GPU memory
FREE_MEMORY_SHARE = 0.5  # of the free GPU memory (measured when the encoder is built) one batch may take at its peak


@dataclass
class PackedBatch:
    """Sequences laid end to end.

    Sequence i owns rows cu_seqlens[i] : cu_seqlens[i+1] of `tokens` and `positions`,
    and is the caller's sequence number order[i].
    """

    tokens: Tensor  # int64 [total]
    cu_seqlens: Tensor  # int32 [n + 1], cu_seqlens[0] == 0, cu_seqlens[-1] == total
    positions: Tensor  # int64 [total], 0 at the first token of every sequence
    max_seqlen: int
    order: list[int]
    bounds: list[int] | None = None  # cu_seqlens as host ints: no GPU sync to read them

    def __post_init__(self) -> None:
        if self.bounds is None and self.cu_seqlens.device.type == "cpu":
            self.bounds = self.cu_seqlens.tolist()

    @property
    def total(self) -> int:
        """Number of packed tokens (rows)."""
        return self.tokens.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        return PackedBatch(
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
            positions=self.positions.to(device, non_blocking=non_blocking),
            max_seqlen=self.max_seqlen,
            order=self.order,
            bounds=self.bounds,
        )

    def pin_memory(self) -> PackedBatch:
        """The same batch in page-locked host memory, so copies to the GPU can overlap compute."""
        return PackedBatch(
            tokens=self.tokens.pin_memory(),
            cu_seqlens=self.cu_seqlens.pin_memory(),
            positions=self.positions.pin_memory(),
            max_seqlen=self.max_seqlen,
            order=self.order,
            bounds=self.bounds,
        )


def _first_fit(sizes: list[int], capacity: int) -> list[list[int]]:
    """First-fit bin packing in O(n log n): item j goes into the lowest-numbered bin with room.

    A max-tree over every bin's free space (unopened bins count as empty, so the first of
    them is found after all open bins) finds that bin by walking down from the root.
    """
    leaves = 1
    while leaves < max(len(sizes), 1):
        leaves *= 2
    free = [0] * leaves + [capacity] * leaves  # free[leaves + b]: room left in bin b
    for node in range(leaves - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for item, size in enumerate(sizes):
        if free[1] >= size:
            node = 1
            while node < leaves:
                node = 2 * node if free[2 * node] >= size else 2 * node + 1
            room = free[node] - size
        else:  # longer than the budget: alone in the next unopened bin
            node, room = leaves + len(bins), 0
        b = node - leaves
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        free[node] = room
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_flat(flat: np.ndarray, lengths: np.ndarray, budget_tokens: int) -> list[PackedBatch]:
    """Pack sequences, given as one concatenated array plus their lengths, into batches of at
    most `budget_tokens` tokens, first-fit-decreasing.

    Sequences are taken longest first (ties in input order) and each goes into the first
    batch with room for it; a sequence longer than the budget gets a batch of its own. The
    result depends only on the lengths and the budget, never on timing or hashing. Batches
    are built with a few NumPy gathers, not one tensor per sequence.
    """
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be positive, got {budget_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.min()) <= 0:
        raise ValueError("cannot pack an empty sequence")
    flat = np.asarray(flat, dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    longest_first = np.argsort(-lengths, kind="stable")
    bins = _first_fit(lengths[longest_first].tolist(), budget_tokens)
    batches = []
    for members in bins:
        order = longest_first[members]
        batch_lengths = lengths[order]
        cu_seqlens = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(batch_lengths, out=cu_seqlens[1:])
        total = int(cu_seqlens[-1])
        owner_start = np.repeat(cu_seqlens[:-1], batch_lengths)
        positions = np.arange(total, dtype=np.int64) - owner_start
        rows = np.repeat(starts[order], batch_lengths) + positions
        batches.append(PackedBatch(
            tokens=torch.from_numpy(flat[rows]),
            cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
            positions=torch.from_numpy(positions),
            max_seqlen=int(batch_lengths.max()),
            order=order.tolist(),
            bounds=cu_seqlens.tolist(),
        ))
    return batches


def auto_batch_tokens(
    device: torch.device,
    bytes_per_token: int,
    cap: int,
    cpu_default: int = 4096,
) -> int:
    """Token budget for one packed batch: `FREE_MEMORY_SHARE` of the free GPU memory over the
    bytes one token needs at peak, capped at `cap` and rounded down to a multiple of 1024.

    On the CPU (no memory query) it is `cpu_default`.
    """
    if device.type != "cuda":
        return cpu_default
    free, _ = torch.cuda.mem_get_info(device)
    fitting = int(free * FREE_MEMORY_SHARE) // bytes_per_token
    return max(MIN_BATCH_TOKENS, min(cap, fitting) // 1024 * 1024)


def segment_ids(cu_seqlens: Tensor, total: int) -> Tensor:
    """For every packed row, the number of the sequence it belongs to (int64 [total])."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    sequences = torch.arange(len(lengths), device=cu_seqlens.device)
    return sequences.repeat_interleave(lengths, output_size=total)


def segment_mean(
    hidden: Tensor,
    cu_seqlens: Tensor,
    start_offset: int = 0,
    end_offset: int = 0,
    max_len: int | None = None,
    validate: bool = True,
) -> Tensor:
    """Mean of each packed sequence's rows, float32 [n, d], computed on hidden's device.

    For a sequence occupying rows [start, end) the mean is over rows
    [start + start_offset, min(end - end_offset, start + start_offset + max_len)):
    start_offset=1, end_offset=1 drops a leading <cls> and trailing <eos>, and max_len
    caps how many rows count (ESM-2's published pooling stops after 1024 residues).
    Defaults pool every row. Sums accumulate in float32 whatever hidden's dtype is, in the
    same order every time (the same input gives the same bits on the GPU too).
    validate=False skips the check that every window is non-empty (a device-to-host sync on
    the GPU); callers that pass it have checked the lengths on the host.
    """
    total, width = hidden.shape
    starts = cu_seqlens[:-1].to(torch.int64)
    lows = starts + start_offset
    highs = cu_seqlens[1:].to(torch.int64) - end_offset
    if max_len is not None:
        highs = torch.minimum(highs, lows + max_len)
    counts = highs - lows
    if validate and bool((counts <= 0).any()):
        raise ValueError("a sequence has no rows left to pool after the offsets")
    owner = segment_ids(cu_seqlens, total)
    rows = torch.arange(total, device=hidden.device)
    pooled = (rows >= lows[owner]) & (rows < highs[owner])
    values = torch.where(pooled[:, None], hidden.float(), 0.0)
    sums = torch.zeros(len(counts), width, dtype=torch.float32, device=hidden.device)
    if hidden.is_cuda:  # index_add_ adds with atomics there, in an order that varies run to run;
        sums.index_put_((owner,), values, accumulate=True)  # this sorts, then sums in a fixed order
    else:
        sums.index_add_(0, owner, values)
    return sums / counts.clamp(min=1)[:, None].to(torch.float32)


@dataclass
class PreparedBatches:
    """Sequences tokenized and packed on the host (pinned when bound for a GPU)."""

    batches: list[PackedBatch]
    orders: list[Tensor]  # int64 copy of each batch's order, pinned alongside
    count: int


def prepare_batches(flat: np.ndarray, lengths: np.ndarray, budget: int, *, packs: bool, pin: bool) -> PreparedBatches:
    """The batches an encoder runs: sequences packed up to `budget` tokens (`pack_flat`) when
    it `packs`, else one sequence each; in page-locked memory when `pin` (bound for a GPU).

    The encoders pack on a GPU, where it pays, and not on the CPU. There the GEMM and vector
    kernels pick their blocking, and their scalar tails, by the batch's shape, and which
    choice rounds how depends on the processor (AVX2 and AVX-512 machines differ). A
    sequence alone in its batch has the same shape whatever else is being embedded, so its
    embedding is a function of the sequence, bit for bit: what makes the reuse of repeated
    frames and resumed shards exact on the CPU. On a GPU a result may differ in the last
    digits by batch.
    """
    batches = pack_flat(flat, lengths, budget if packs else 1) if len(lengths) else []
    orders = [torch.tensor(b.order, dtype=torch.int64) for b in batches]
    if pin:
        batches = [b.pin_memory() for b in batches]
        orders = [o.pin_memory() for o in orders]
    return PreparedBatches(batches, orders, len(lengths))
