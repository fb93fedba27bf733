"""`virnucpro run` end to end on the demo models: files, ids, features, every read accounted."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from core.dnabert import load_dnabert
from core.esm2 import load_esm2
from job.cli import main


def _run(demo_models, inputs, out, *extra: str) -> int:
    return main([
        "run", "--input", *map(str, inputs), "--output", str(out),
        "--esm-model", str(demo_models / "esm2_demo.pt"),
        "--dnabert-model", str(demo_models / "dnabert_demo"),
        "--classifier", str(demo_models / "classifier_500.pth"),
        "--device", "cpu", *extra,
    ])


def _column(path, index: int = 0) -> list[str]:
    return [line.split("\t")[index] for line in path.read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def run_output(demo_models, reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    inputs = [reference / "test_with_orfs.fa", reference / "test_fixed_500bp.fa", reference / "test_sequences_small.fa"]
    assert _run(demo_models, inputs, out / "result", "--write-features") == 0
    translated = []
    for path in inputs:
        target = out / f"translate-{path.stem}"
        assert main(["translate", "--input", str(path), "--chunk-length", "500", "--out-dir", str(target)]) == 0
        translated += [line[1:] for line in (target / "identified_protein.faa").read_text().splitlines() if line.startswith(">")]
    return out / "result", translated, inputs


def test_frame_ids_equal_translate_and_files_are_complete(run_output) -> None:
    result, translated, _ = run_output
    assert _column(result / "prediction_results.txt") == translated
    chunks = sorted({frame_id[:-2] for frame_id in translated})
    assert _column(result / "prediction_results_highestscore.csv") == chunks
    assert (result / "prediction_results.txt").read_text().startswith("Sequence_ID\tPrediction\tscore1\tscore2\n")


def test_features_are_dna_then_protein_embeddings(run_output, demo_models) -> None:
    result, translated, _ = run_output
    with h5py.File(result / "features.h5") as h5:
        ids = [i.decode() for i in h5["frame_ids"][:]]
        features = h5["features"][:]
    assert ids == translated and features.dtype == np.float32
    nucleotides = (result.parent / "translate-test_with_orfs" / "identified_nucleotide.fa").read_text().splitlines()[1::2]
    proteins = (result.parent / "translate-test_with_orfs" / "identified_protein.faa").read_text().splitlines()[1::2]
    cpu = torch.device("cpu")
    dna = load_dnabert(str(demo_models / "dnabert_demo"), cpu).embed(nucleotides)
    protein = load_esm2(str(demo_models / "esm2_demo.pt"), cpu).embed(proteins)
    expected = torch.cat([dna, protein], dim=1).numpy()
    np.testing.assert_allclose(features[: len(proteins)], expected, rtol=1e-5, atol=1e-6)


def test_every_read_once_with_reasons(run_output) -> None:
    result, _, inputs = run_output
    read_ids = [line[1:].split()[0] for path in inputs for line in path.read_text().splitlines() if line.startswith(">")]
    rows = [line.split("\t") for line in (result / "reads.tsv").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == read_ids
    by_id = {row[0]: row for row in rows}
    for i in range(11):  # the published tool drops these silently
        assert by_id[f"test_seq_{i}"][5:7] == ["none", "no_open_frame"]
    assert by_id["synthetic_seq_1"][3] == "2" and by_id["synthetic_seq_1"][5] in ("virus", "others")


def test_demo_models_are_flagged_in_summary_and_log(demo_models, reference, tmp_path, capsys) -> None:
    assert _run(demo_models, [reference / "test_with_orfs.fa"], tmp_path / "o") == 0
    summary = json.loads((tmp_path / "o" / "_SUCCESS").read_text())
    assert summary["demo_models"] is True and "meaningless" in summary["warning"]
    assert any("demo" in line and "meaningless" in line for line in capsys.readouterr().err.splitlines())


def test_safetensors_classifier_gives_the_same_rows(demo_models, reference, tmp_path) -> None:
    pth = tmp_path / "pth"
    assert _run(demo_models, [reference / "test_fixed_500bp.fa"], pth) == 0
    st = tmp_path / "st"
    models = tmp_path / "models"
    shutil.copytree(demo_models, models)
    (models / "classifier_500.pth").unlink()
    (models / "classifier_500.safetensors").rename(models / "classifier_500.pth.safetensors")
    assert main([
        "run", "--input", str(reference / "test_fixed_500bp.fa"), "--output", str(st),
        "--esm-model", str(models / "esm2_demo.pt"), "--dnabert-model", str(models / "dnabert_demo"),
        "--classifier", str(models / "classifier_500.pth.safetensors"), "--device", "cpu",
    ]) == 0
    assert (st / "prediction_results.txt").read_bytes() == (pth / "prediction_results.txt").read_bytes()


def test_chunk_length_mismatch_is_refused_unless_forced(demo_models, reference, tmp_path, capsys) -> None:
    fasta = [reference / "test_with_orfs.fa"]
    assert _run(demo_models, fasta, tmp_path / "a", "--chunk-length", "300") == 65
    assert "--force-chunk-length" in capsys.readouterr().err
    assert _run(demo_models, fasta, tmp_path / "b", "--chunk-length", "300", "--force-chunk-length") == 0


MALFORMED = {
    "crlf.fa": (b">r1 desc\r\nACGTACGTACGTAAAGGG\r\n", {"r1": None}),
    "header_only.fa": (b">lonely\n", {"lonely": "empty"}),
    "one_bp.fa": (b">a\nA\n>b\nAC\n", {"a": "too_short", "b": "too_short"}),
    "duplicates.fa": (b">d\nACGTTTGGGCCC\n>d\nACGTTTGGGCCC\n", {"d": None}),
    "empty.fa": (b"", {}),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_corpus_gives_documented_statuses(name: str, demo_models, tmp_path) -> None:
    data, expected = MALFORMED[name]
    path = tmp_path / name
    path.write_bytes(data)
    assert _run(demo_models, [path], tmp_path / "o") == 0
    rows = [line.split("\t") for line in (tmp_path / "o" / "reads.tsv").read_text().splitlines()[1:]]
    n_records = data.count(b">")
    assert len(rows) == n_records  # every record exactly once, duplicates included
    reasons = {}
    for row in rows:
        reasons.setdefault(row[0], []).append(row[6])
    for read_id, reason in expected.items():
        assert reasons[read_id][0] == (reason or "") or (reason is None and reasons[read_id][0] == "no_open_frame")
    if name == "duplicates.fa":
        assert reasons["d"][1] == "duplicate_id"
    if name == "one_bp.fa":
        assert [row[2] for row in rows] == ["1", "1"]  # one chunk each, no codon in it


@pytest.mark.parametrize(("data", "words"), [(b"\x00\x01binary", "binary"), (b"ACGT\n", "before the first"), (b">\nAC\n", "no id")])
def test_malformed_structure_is_a_clear_error(data: bytes, words: str, demo_models, tmp_path, capsys) -> None:
    path = tmp_path / "bad.fa"
    path.write_bytes(data)
    assert _run(demo_models, [path], tmp_path / "o") == 65
    err = capsys.readouterr().err
    assert "bad.fa" in err and "line" in err and words in err and "Traceback" not in err
