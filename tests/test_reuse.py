"""Repeated frames are embedded once (issue 14): same results as embedding every frame, each
distinct sequence through each encoder once per shard, a bounded memo, resumes that embed the
same batches as an uninterrupted run, and the CPU batch invariance all of it leans on."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from core.classifier import load_classifier
from core.dnabert import load_dnabert
from core.esm2 import load_esm2
from core.frames import chunk_record, open_frames
from core.memo import EmbeddingMemo
from core.pipeline import Predictor
from core.reads import Record

CPU = torch.device("cpu")
CODONS = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in ("TAA", "TAG", "TGA")]


class Recording:
    """An encoder whose `prepare` calls are kept: the sequences that reach it, call by call."""

    def __init__(self, encoder) -> None:  # noqa: ANN001
        self.encoder, self.calls = encoder, []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.encoder, name)

    def prepare(self, sequences):  # noqa: ANN001, ANN201
        self.calls.append(list(sequences))
        return self.encoder.prepare(sequences)

    @property
    def sequences(self) -> list[str]:
        return [s for call in self.calls for s in call]


@pytest.fixture(scope="module")
def models(demo_models: Path) -> tuple:
    return (load_dnabert(str(demo_models / "dnabert_demo"), CPU), load_esm2(str(demo_models / "esm2_demo.pt"), CPU),
            load_classifier(str(demo_models / "classifier_500.safetensors"), CPU))


def predictor(models: tuple, reuse: bool = True, group_reads: int = 5, memo: int = 65536) -> Predictor:
    dna, esm, classifier = models
    return Predictor(Recording(dna), Recording(esm), classifier, 500, group_reads=group_reads, pipelined=True,
                     reuse=reuse, memo_sequences=memo)


def repeated_reads(count: int = 40, seed: int = 5) -> list[Record]:
    """Reads of 150-1100 bp with open frames; after the first 8, half copy an earlier read (so
    repeats fall in the same group of 5 and in later ones), one of them reverse-complemented
    (its frames are another read's, strands swapped); and a read that cannot be scored."""
    rng = random.Random(seed)
    sequences: list[str] = []
    for n in range(count):
        if n < 8 or rng.random() < 0.5:
            sequences.append("".join(rng.choice(CODONS) for _ in range(rng.choice([50, 100, 170, 367]))))
        else:
            sequences.append(sequences[rng.randrange(n)])
    sequences[17] = sequences[2][::-1].translate(str.maketrans("ACGT", "TGCA"))
    for copy, original in ((11, 10), (22, 21), (33, 31), (34, 31)):  # within a group too
        sequences[copy] = sequences[original]
    records = [Record(f"r{n}", s, n + 1) for n, s in enumerate(sequences)]
    records[19] = Record("bad", "AC-GT", 20, "invalid_characters")
    return records


def distinct_frames(records: list[Record]) -> tuple[set[str], set[str]]:
    frames = [f for r in records if r.status is None for k in open_frames(chunk_record(r.id, r.sequence, 500)) for f in k]
    return {f.nucleotide for f in frames}, {f.protein for f in frames}


def same_results(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.summary == y.summary and x.frames == y.frames
        assert np.array_equal(x.features, y.features)


def test_repeats_give_exactly_the_results_of_embedding_every_frame(models: tuple) -> None:
    records = repeated_reads()
    with_reuse = list(predictor(models).predict(records, with_features=True))
    without = list(predictor(models, reuse=False).predict(records, with_features=True))
    same_results(with_reuse, without)
    scores: dict[tuple, list] = {}  # per group: the classifier's batch is the group
    features: dict[tuple, list] = {}
    for n, (record, result) in enumerate(zip(records, with_reuse)):
        if record.status is None:
            frames = [f for k in open_frames(chunk_record(record.id, record.sequence, 500)) for f in k]
            for frame, score, row in zip(frames, result.frames, result.features):
                scores.setdefault((n // 5, frame.nucleotide, frame.protein), []).append((score.score_others, score.score_virus))
                features.setdefault((frame.nucleotide, frame.protein), []).append(row)
    repeated = [rows for rows in scores.values() if len(rows) > 1]
    assert len(repeated) >= 3, "the input should repeat frames within a group"
    for rows in repeated:  # equal frames of a group, equal scores, to the bit
        assert all(r == rows[0] for r in rows)
    for rows in features.values():  # and equal features across groups
        assert all(np.array_equal(r, rows[0]) for r in rows)
    assert sum(len(rows) > 1 for rows in features.values()) > len(repeated)


def test_each_distinct_sequence_reaches_each_encoder_once_per_shard(models: tuple) -> None:
    records = repeated_reads()
    nucleotides, proteins = distinct_frames(records)
    reused = predictor(models)
    results = list(reused.predict(records))
    assert sum(len(r.frames) for r in results) > len(nucleotides) + 10  # repeats within and across groups
    assert sorted(reused.dnabert.sequences) == sorted(nucleotides)
    assert sorted(reused.esm.sequences) == sorted(proteins)
    assert len(reused.esm.calls) > 1  # several groups, so reuse across groups is exercised
    every = predictor(models, reuse=False)
    list(every.predict(records))
    assert len(every.dnabert.sequences) == sum(len(r.frames) for r in results)


def test_the_memo_is_bounded_and_stays_right_when_full(models: tuple) -> None:
    records = repeated_reads()
    nucleotides, _ = distinct_frames(records)
    small = predictor(models, memo=3)
    same_results(list(small.predict(records, with_features=True)),
                 list(predictor(models, reuse=False).predict(records, with_features=True)))
    assert len(small.dnabert.sequences) > len(nucleotides)  # dropped sequences are embedded again


def test_memo_least_recently_used_goes_first_and_rows_are_read_before_reuse() -> None:
    memo = EmbeddingMemo(3, 2, CPU)

    def step(sequences: list[str], values: dict[str, float]) -> dict[str, float]:
        lookup = memo.plan(sequences)
        fresh = torch.tensor([[values[s]] * 2 for s in lookup.new + lookup.recovered])
        out = memo.gather(lookup, [torch.from_numpy(a) for a in lookup.indices()], fresh)
        return {s: float(out[i, 0]) for i, s in enumerate(sequences)} | {"new": lookup.new}

    value = {s: float(i) for i, s in enumerate("abcdefgh")}
    assert step(list("abc"), value)["new"] == list("abc")
    assert step(list("a"), value)["new"] == []  # a is now the most recently used
    got = step(list("de"), value)  # drops b then c
    assert got["new"] == list("de") and len(memo) == 3 and len(memo.values) <= 3
    got = step(list("abc"), value)
    assert got["new"] == list("bc") and got["a"] == value["a"]
    # more new sequences than room: a row is read before a later one of the group overwrites it
    got = step(list("cfgha"), value)
    assert got == {**{s: value[s] for s in "cfgha"}, "new": list("fgha")}
    assert len(memo) == 3 and len(memo.values) == 3
    assert step(list("gha"), value)["new"] == []


def test_a_resumed_shard_embeds_the_same_batches_and_gives_the_same_results(models: tuple) -> None:
    records = repeated_reads()
    whole = predictor(models)
    uninterrupted = list(whole.predict(records, with_features=True))
    resumed = predictor(models)
    skip = 15  # three groups of 5 committed
    after = list(resumed.predict(records[skip:], with_features=True, earlier=iter(records[:skip])))
    same_results(after, uninterrupted[skip:])  # on the CPU, to the bit
    before = predictor(models)  # the uninterrupted run's calls up to the resume point
    list(before.predict(records[:skip]))
    for name, known in zip(("dnabert", "esm"), distinct_frames(records[:skip])):
        expected = getattr(whole, name).calls[len(getattr(before, name).calls):]
        calls = getattr(resumed, name).calls
        # each call of the uninterrupted run after the resume point is made again, the same
        # sequences in the same packed batches; the others embed sequences met before it
        assert expected and [c for c in calls if c in expected] == expected
        recovered = [c for c in calls if c not in expected]
        assert recovered and all(set(c) <= known for c in recovered)


def test_cpu_results_do_not_depend_on_the_rest_of_the_batch(models: tuple) -> None:
    """What makes reuse and resumes bit-exact on the CPU, on any processor: a sequence's
    embedding, and a frame's scores, are the same whichever others share its batch (or none).
    Packed batches failed this on AVX2 machines (ATEN_CPU_CAPABILITY=avx2 shows it on others)."""
    records = repeated_reads()[:14]
    nucleotides, proteins = (sorted(s) for s in distinct_frames(records))
    rng = random.Random(1)
    dna, esm, classifier = models
    nucleotides, proteins = ["AAA", "ACG"] + nucleotides, ["M", "W", "MK"] + proteins  # the tiniest too
    for encoder, sequences in ((dna, nucleotides), (esm, proteins)):
        full = encoder.embed(sequences)
        for i in range(3):
            assert torch.equal(encoder.embed([sequences[i]]), full[[i]]), sequences[i]
        for size in (1, 2, len(sequences) // 2):
            picked = sorted(rng.sample(range(len(sequences)), size))
            assert torch.equal(encoder.embed([sequences[i] for i in picked]), full[picked])
    features = torch.randn(37, classifier.input_dim, generator=torch.Generator().manual_seed(3))
    features[30:] = features[3]  # equal rows in other places of the batch
    full = classifier.score(features)
    assert all(torch.equal(full[i], full[3]) for i in range(30, 37))
    for size in (1, 2, 5, 18):
        picked = sorted(rng.sample(range(len(features)), size))
        assert torch.equal(classifier.score(features[picked]), full[picked])


def test_no_reuse_flows_from_the_command_line_to_the_predictor(demo_models: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import job.batch
    from core.pipeline import load_predictor
    from job.cli import main

    configs = []
    monkeypatch.setattr(job.batch, "run_batch", lambda config, *_: configs.append(config) or 0)
    models = [str(demo_models / "esm2_demo.pt"), str(demo_models / "dnabert_demo"), str(demo_models / "classifier_500.pth")]
    common = ["run", "--input", "x.fa", "--output", str(tmp_path / "out"), "--esm-model", models[0],
              "--dnabert-model", models[1], "--classifier", models[2]]
    assert main(common) == 0 and main([*common, "--no-reuse"]) == 0
    assert [config.reuse for config in configs] == [True, False]
    assert [load_predictor(*models, device="cpu", reuse=c.reuse).reuse for c in configs] == [True, False]
