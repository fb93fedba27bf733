import random

import pytest
import torch

from core.packing import PackedBatch, _first_fit, segment_ids, segment_mean
from oracles import pack


def sequences(lengths):
    return [[100 * i + j for j in range(n)] for i, n in enumerate(lengths)]


def naive_first_fit(sizes, capacity):
    bins, room = [], []
    for item, size in enumerate(sizes):
        for b, free in enumerate(room):
            if size <= free:
                bins[b].append(item)
                room[b] -= size
                break
        else:
            bins.append([item])
            room.append(max(capacity - size, 0))
    return bins


def test_first_fit_decreasing_places_longest_first_in_first_bin_with_room():
    batches = pack(sequences([5, 4, 3, 3, 2, 1]), budget_tokens=8)
    assert [b.order for b in batches] == [[0, 2], [1, 3, 5], [4]]


def test_sequence_longer_than_budget_is_alone():
    batches = pack(sequences([3, 10, 2]), budget_tokens=5)
    assert [b.order for b in batches] == [[1], [0, 2]]
    assert batches[0].max_seqlen == 10


def test_tree_first_fit_matches_naive_first_fit():
    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.randint(1, 60)
        sizes = sorted((rng.randint(1, 80) for _ in range(rng.randint(0, 70))), reverse=True)
        assert _first_fit(sizes, capacity) == naive_first_fit(sizes, capacity)


def test_every_sequence_packed_once_within_budget_and_deterministic():
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    batches = pack(sequences(lengths), budget_tokens=1000)
    assert sorted(i for b in batches for i in b.order) == list(range(len(lengths)))
    for b in batches:
        assert len(b.tokens) <= 1000 or len(b.order) == 1
    again = pack(sequences(lengths), budget_tokens=1000)
    assert [b.order for b in again] == [b.order for b in batches]


def test_equal_lengths_keep_input_order():
    assert [b.order for b in pack(sequences([2, 2, 2, 2]), budget_tokens=4)] == [[0, 1], [2, 3]]


def test_layout_tokens_cu_seqlens_positions():
    token_lists = [torch.tensor([7, 8]), torch.tensor([1, 2, 3]), torch.tensor([9])]
    (batch,) = pack(token_lists, budget_tokens=100)
    assert batch.order == [1, 0, 2]
    assert batch.tokens.dtype == torch.int64 and batch.tokens.tolist() == [1, 2, 3, 7, 8, 9]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 3, 5, 6]
    assert batch.positions.dtype == torch.int64 and batch.positions.tolist() == [0, 1, 2, 0, 1, 0]
    assert batch.max_seqlen == 3
    assert segment_ids(batch.cu_seqlens, 6).tolist() == [0, 0, 0, 1, 1, 2]


def test_to_keeps_every_field():
    (batch,) = pack(sequences([2, 3]), budget_tokens=10)
    moved = batch.to("cpu")
    assert isinstance(moved, PackedBatch)
    assert torch.equal(moved.tokens, batch.tokens) and torch.equal(moved.positions, batch.positions)
    assert torch.equal(moved.cu_seqlens, batch.cu_seqlens)
    assert (moved.max_seqlen, moved.order) == (batch.max_seqlen, batch.order)


def test_nothing_to_pack_and_bad_arguments():
    assert pack([], budget_tokens=10) == []
    with pytest.raises(ValueError):
        pack(sequences([3]), budget_tokens=0)
    with pytest.raises(ValueError):
        pack([[1], []], budget_tokens=10)


@pytest.mark.parametrize("start_offset,end_offset,max_len", [(0, 0, None), (1, 1, None), (1, 1, 3), (2, 0, 1)])
def test_segment_mean_matches_per_sequence_slices(start_offset, end_offset, max_len):
    lengths = [4, 9, 3, 6]
    cu_seqlens = torch.tensor([0, 4, 13, 16, 22], dtype=torch.int32)
    hidden = torch.randn(sum(lengths), 5, generator=torch.Generator().manual_seed(0))
    expected = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        low, high = start + start_offset, end - end_offset
        if max_len is not None:
            high = min(high, low + max_len)
        expected.append(hidden[low:high].mean(0))
    pooled = segment_mean(hidden, cu_seqlens, start_offset, end_offset, max_len)
    torch.testing.assert_close(pooled, torch.stack(expected), rtol=1e-6, atol=1e-6)


def test_segment_mean_returns_float32_and_refuses_empty_windows():
    cu_seqlens = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert segment_mean(torch.ones(5, 3, dtype=torch.float16), cu_seqlens).dtype == torch.float32
    with pytest.raises(ValueError):
        segment_mean(torch.ones(5, 3), cu_seqlens, 1, 1)
