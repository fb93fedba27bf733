"""Embeddings already computed in a shard, kept by sequence, so a repeat is not embedded again.

Sequencing data repeats itself (PCR and optical duplicates, amplicons, high-coverage
viruses), and equal reads give equal frames. `EmbeddingMemo` holds, for one encoder, the
embedding of each distinct sequence met lately, keyed by the exact sequence (no digest, so
no collision argument is needed), its rows on the encoder's device.

Bounded: at most `capacity` sequences; when full, the least recently used one is dropped
(its row reused). The order of use is the order of the reads, so what is kept, and hence
which sequences are embedded in which batch, depends only on the input: the same shard gives
the same bytes. Memory: `capacity` rows of `dim` float32 on the device (lazily grown; 670 MB
at 65,536 ESM-2 3B rows, 200 MB for DNABERT-S) and the sequences on the host. Per-frame
rows (`--write-features`: 3,328 float32 a frame) are never kept here: each group's are
gathered from the memo and copied back with the group, as without reuse.

A group of sequences goes through it in three steps, queued in this order on one stream:
`plan` (host: which are known, which must be embedded), `gather` (device: the known rows
and the fresh ones, in the group's order) and then the fresh rows are stored. Rows are read
before any is overwritten, so a row dropped and reused within one group is still right.

A resumed shard `plan`s the groups it skips without embedding them (`remember`): the memo
then knows the same sequences as in an uninterrupted run, without their rows, and a group
after the resume embeds exactly the sequences the uninterrupted run embedded, in the same
batches; the known sequences whose rows are missing are embedded apart (`Lookup.recovered`).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

MEMO_SEQUENCES = 65536  # per encoder, per shard


@dataclass
class Lookup:
    """Where each of a group's distinct sequences gets its embedding.

    Row i of the group's embeddings comes from the memo (`hit_rows`, from `hit_slots`) or
    from the fresh embeddings: those of `new` then those of `recovered`, for `fresh_rows`.
    Fresh embedding j is stored in slot `store_slots[k]` for j = `store_fresh[k]`.
    """

    count: int
    new: list[str]  # not in the memo: embedded together, as in any run over the same reads
    recovered: list[str]  # known but without a row (the shard was resumed): embedded apart
    hit_rows: np.ndarray
    hit_slots: np.ndarray
    fresh_rows: np.ndarray  # int64 [len(new) + len(recovered)]
    store_fresh: np.ndarray
    store_slots: np.ndarray

    def indices(self) -> list[np.ndarray]:
        return [self.hit_rows, self.hit_slots, self.fresh_rows, self.store_fresh, self.store_slots]


class EmbeddingMemo:
    """Embeddings of up to `capacity` distinct sequences of one encoder (see the module)."""

    def __init__(self, capacity: int, dim: int, device: torch.device) -> None:
        if capacity < 1:
            raise ValueError(f"a memo holds at least one sequence, not {capacity}")
        self.capacity, self.dim, self.device = capacity, dim, device
        self._slots: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._filled = np.zeros(capacity, bool)  # the slot holds its sequence's embedding
        self.values = torch.empty(0, dim, dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return len(self._slots)

    def plan(self, sequences: Sequence[str]) -> Lookup:
        """Look up distinct `sequences` (a group's, in the order they first occur), making
        room for the new ones. The fresh rows are marked stored: `gather` must follow."""
        hit_rows, hit_slots, new, new_rows, new_slots, recovered, recovered_rows, recovered_slots = (
            [], [], [], [], [], [], [], [])
        for row, sequence in enumerate(sequences):
            slot = self._slots.get(sequence)
            if slot is None:
                slot = len(self._slots) if len(self._slots) < self.capacity else self._slots.popitem(last=False)[1]
                self._slots[sequence] = slot
                self._filled[slot] = False
                new.append(sequence), new_rows.append(row), new_slots.append(slot)
                continue
            self._slots.move_to_end(sequence)
            if self._filled[slot]:
                hit_rows.append(row), hit_slots.append(slot)
            else:
                recovered.append(sequence), recovered_rows.append(row), recovered_slots.append(slot)
        fresh = new + recovered
        slots = new_slots + recovered_slots
        # a sequence dropped again within the group (more new ones than `capacity`) is not stored
        kept = [j for j, (sequence, slot) in enumerate(zip(fresh, slots)) if self._slots.get(sequence) == slot]
        store_slots = np.array([slots[j] for j in kept], np.int64)
        self._filled[store_slots] = True
        return Lookup(
            len(sequences), new, recovered, np.array(hit_rows, np.int64), np.array(hit_slots, np.int64),
            np.array(new_rows + recovered_rows, np.int64), np.array(kept, np.int64), store_slots,
        )

    def remember(self, sequences: Sequence[str]) -> None:
        """What `plan` does to the memo's keys, without embedding anything: for the groups a
        resumed shard skips. Their sequences are known after it, their rows missing."""
        lookup = self.plan(sequences)
        self._filled[lookup.store_slots] = False

    def gather(self, lookup: Lookup, indices: list[Tensor], fresh: Tensor) -> Tensor:
        """[lookup.count, dim] embeddings in the group's order, on the device; then the fresh
        rows are stored. `indices` are `lookup.indices()` already on the device; nothing is
        read back to the host."""
        hit_rows, hit_slots, fresh_rows, store_fresh, store_slots = indices
        out = torch.empty(lookup.count, self.dim, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            if len(lookup.hit_rows):
                out[hit_rows] = self.values[hit_slots]
            if len(lookup.fresh_rows):
                out[fresh_rows] = fresh
            if len(lookup.store_slots):
                self._grow(int(lookup.store_slots.max()) + 1)
                self.values[store_slots] = fresh[store_fresh]
        return out

    def _grow(self, rows: int) -> None:
        if rows <= len(self.values):
            return
        grown = torch.empty(min(self.capacity, max(rows, 2 * len(self.values))), self.dim,
                            dtype=torch.float32, device=self.device)
        grown[: len(self.values)] = self.values
        self.values = grown
