"""Cold start (issue 14): the converted-weights cache, the compiler's artifacts, the warm-up
that stops on a stop. Demo models on the CPU; the caches work the same for any dtype."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from core.dnabert import load_dnabert, write_demo_model
from core.errors import ModelLoadError
from job.errors import Interrupted
from core.esm2 import load_esm2, write_demo_checkpoint
from job.model_cache import (
    WeightsCache,
    compiler_artifacts_path,
    compiler_key,
    load_compiler_artifacts,
    read_weights,
    write_weights,
)
from job.models import sha256_path
from job_support import JobProcess, bucket, run_args, s3_endpoint, subprocess_env, write_reads  # noqa: F401 (fixtures)

CPU = torch.device("cpu")
PROTEINS = ["MKVLAAGIVGLLLA" * 3, "ACDEFGHIKLMNPQRSTVWY", "M<mask>KLV"]
DNA = ["ACGTACGTTTGACCA" * 8, "ACGGT", "TTTTGGGGCCCCAAAA" * 3]


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    write_demo_checkpoint(tmp_path / "esm.pt")
    write_demo_model(tmp_path / "dnabert")
    return {"esm": tmp_path / "esm.pt", "dnabert": tmp_path / "dnabert"}


LOADERS = {"esm": (load_esm2, PROTEINS), "dnabert": (load_dnabert, DNA)}


def hidden(source: Path) -> Path:
    """Move the source away (as root, permissions would not stop a read): whatever loads now
    cannot have read it."""
    away = source.with_name(source.name + ".away")
    source.rename(away)
    return away


@pytest.mark.parametrize("name", ["esm", "dnabert"])
def test_converted_weights_are_used_without_the_source_and_embed_the_same(models, tmp_path, name):
    load, inputs = LOADERS[name]
    source = models[name]
    cache = WeightsCache(tmp_path / "converted", sha256_path(source))
    first = load(str(source), CPU, cache=cache)
    assert first.loaded_from == "source (cached now)"
    expected = first.embed(inputs)
    away = hidden(source)
    again = load(str(source), CPU, cache=cache)
    assert again.loaded_from == "cache"
    assert torch.equal(again.embed(inputs), expected)
    assert again.backend == first.backend and again.dim == first.dim
    away.rename(source)
    # without the cache the same numbers come from the source
    assert torch.equal(load(str(source), CPU).embed(inputs), expected)


@pytest.mark.parametrize("name", ["esm", "dnabert"])
def test_a_new_source_sha256_rebuilds_the_converted_weights(models, tmp_path, name):
    load, inputs = LOADERS[name]
    source = models[name]
    old = WeightsCache(tmp_path / "converted", sha256_path(source))
    old_embeddings = load(str(source), CPU, cache=old).embed(inputs)
    if name == "esm":  # the same path, new weights
        write_demo_checkpoint(source, seed=1)
    else:
        write_demo_model(source, seed=1)
    new = WeightsCache(tmp_path / "converted", sha256_path(source))
    assert new.source_sha256 != old.source_sha256
    rebuilt = load(str(source), CPU, cache=new)
    assert rebuilt.loaded_from == "source (cached now)"
    embeddings = rebuilt.embed(inputs)
    assert not torch.equal(embeddings, old_embeddings)
    hidden(source)
    cached = load(str(source), CPU, cache=new)
    assert cached.loaded_from == "cache" and torch.equal(cached.embed(inputs), embeddings)


def damaged(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flipped byte":
        data[-5] ^= 0xFF  # in the last tensor's bytes: the header still parses
        path.write_bytes(bytes(data))
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "empty"])
def test_a_damaged_converted_file_is_refused_and_written_again(models, tmp_path, how, caplog):
    source = models["esm"]
    cache = WeightsCache(tmp_path / "converted", sha256_path(source))
    expected = load_esm2(str(source), CPU, cache=cache).embed(PROTEINS)
    path = cache.path("esm2", torch.float32)
    damaged(path, how)
    with caplog.at_level("WARNING", logger="job.model_cache"):
        reloaded = load_esm2(str(source), CPU, cache=cache)
    assert reloaded.loaded_from == "source (cached now)"  # refused, loaded from the source, rewritten
    assert any("ignoring the converted weights" in r.getMessage() for r in caplog.records)
    assert torch.equal(reloaded.embed(PROTEINS), expected)
    hidden(source)
    assert load_esm2(str(source), CPU, cache=cache).loaded_from == "cache"


def test_a_file_under_another_key_is_refused(models, tmp_path):
    source = models["esm"]
    cache = WeightsCache(tmp_path / "converted", sha256_path(source))
    load_esm2(str(source), CPU, cache=cache)
    other = WeightsCache(tmp_path / "converted", "0" * 64)
    cache.path("esm2", torch.float32).rename(other.path("esm2", torch.float32))  # renamed by hand
    assert other.read("esm2", torch.float32, CPU) is None


WRITER = """
import sys, torch
from pathlib import Path
from job.model_cache import write_weights
state = {f"w{i}": torch.full((4096, 4096), float(i)) for i in range(24)}  # 1.6 GB: seconds to write
write_weights(Path(sys.argv[1]), state, {"model": "big"})
"""


def test_a_writer_killed_mid_write_leaves_nothing_that_is_trusted(tmp_path):
    target = tmp_path / "converted" / "big.safetensors"
    env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env)
    deadline = time.monotonic() + 120
    while not list(target.parent.glob(".big.safetensors.*.tmp")):
        assert writer.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = list(target.parent.glob(".big.safetensors.*.tmp"))
    assert leftovers and not target.exists()  # killed mid-write: nothing under the final name
    cache = WeightsCache(target.parent, "f" * 64)
    assert cache.read("big", torch.float32, CPU) is None
    # the next writer removes the dead writer's leftovers and writes a whole file
    assert write_weights(target, {"w": torch.ones(3)}, {"model": "small"})
    assert not any(p.exists() for p in leftovers)
    tensors, metadata = read_weights(target, {"model": "small"}, CPU)
    assert torch.equal(tensors["w"], torch.ones(3))


def test_writers_of_one_file_take_turns(tmp_path):
    target = tmp_path / "converted" / "x.safetensors"
    target.parent.mkdir()
    with open(target.with_name(".x.safetensors.lock"), "a") as held:  # another process writing it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert write_weights(target, {"w": torch.ones(3)}, {}) is False
        assert not target.exists()
    results: list[bool] = []
    state = {"w": torch.arange(1_000_000, dtype=torch.float32)}
    threads = [threading.Thread(target=lambda: results.append(write_weights(target, state, {}))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert any(results)
    tensors, _ = read_weights(target, {}, CPU)
    assert torch.equal(tensors["w"], state["w"])
    assert not list(target.parent.glob("*.tmp"))


def test_tied_weights_are_stored_once_and_tied_again(models, tmp_path):
    source = models["esm"]
    cache = WeightsCache(tmp_path / "converted", sha256_path(source))
    load_esm2(str(source), CPU, cache=cache)
    path = cache.path("esm2", torch.float32)
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert "lm_head.weight" not in header and "embed_tokens.weight" in header
    model = load_esm2(str(source), CPU, cache=cache).model
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()


# --- the compiler's artifacts -----------------------------------------------------------------


def test_compiler_key_follows_torch_the_device_and_the_engine(monkeypatch):
    engine = {"esm": "float16 varlen compiled", "batch_tokens": 65536, "widths": [768, 2560]}
    key = compiler_key(engine, CPU)
    assert key == compiler_key(dict(engine), CPU)
    assert key != compiler_key({**engine, "batch_tokens": 32768}, CPU)
    assert key != compiler_key({**engine, "esm": "float16 sdpa_padded compiled"}, CPU)
    assert key != compiler_key(engine, torch.device("meta"))
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert key != compiler_key(engine, CPU)


def test_compiler_artifacts_that_cannot_be_used_are_reported_not_raised(tmp_path, caplog):
    path = compiler_artifacts_path(tmp_path, "k")
    assert load_compiler_artifacts(path) == ("missing", set())
    path.write_bytes(b"virnucpro-compiler-artifacts 1\n" + b'{"bytes": 10, "xxh3_128": "00"}\n' + b"12345")
    with caplog.at_level("WARNING", logger="job.model_cache"):
        status, loaded = load_compiler_artifacts(path)
    assert status == "refused: ValueError" and loaded == set()
    path.write_bytes(b"something else")
    assert load_compiler_artifacts(path)[0] == "refused: ValueError"


COMPILE_AND_SAVE = """
import sys, torch
from pathlib import Path
from job.model_cache import load_compiler_artifacts, save_compiler_artifacts
path = Path(sys.argv[1])
status, loaded = load_compiler_artifacts(path)
def f(x): return torch.nn.functional.gelu(x) * 3 + 1
x = torch.randn(50, 8); torch._dynamo.mark_dynamic(x, 0)
torch.compile(f)(x)
print(status, len(loaded), save_compiler_artifacts(path, loaded), sep="|")
"""


@pytest.mark.slow
def test_compiler_artifacts_saved_once_and_loaded_by_the_next_process(tmp_path):
    path = compiler_artifacts_path(tmp_path / "compiled", "k")

    def fresh_process() -> list[str]:
        env = {**subprocess_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{time.monotonic_ns()}")}
        done = subprocess.run([sys.executable, "-c", COMPILE_AND_SAVE, str(path)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split("|")

    status, count, saved = fresh_process()
    assert (status, count, saved) == ("missing", "0", "saved") and path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    status, count, saved = fresh_process()  # an empty inductor cache: the artifacts are all it has
    assert status == "loaded" and int(count) > 0 and saved == "unchanged"
    path.write_bytes(path.read_bytes()[:-10])  # truncated: refused, compiled again, saved again
    status, count, saved = fresh_process()
    assert (status, saved) == ("refused: ValueError", "saved")


# --- a stop during the warm-up ----------------------------------------------------------------


def test_warm_up_returns_between_shapes_once_stopped(models, monkeypatch):
    encoder = load_dnabert(str(models["dnabert"]), CPU, 1000, attention="flex", compile=True)
    stop = threading.Event()
    shapes = []

    def pooled(batch):
        shapes.append(batch.total)
        stop.set()  # a SIGTERM arrives while the first shape compiles
        return torch.zeros(len(batch.order), encoder.dim)

    monkeypatch.setattr(encoder, "_pooled", pooled)
    encoder.warm_up(stop)
    assert len(shapes) == 1  # of the four flex buckets
    esm = load_esm2(str(models["esm"]), CPU, compile=True)
    monkeypatch.setattr(esm, "_pooled", lambda batch: shapes.append(batch.total))
    esm.warm_up(stop)
    assert len(shapes) == 1  # stopped already: nothing more compiled


@pytest.mark.slow
def test_a_stop_during_the_warm_up_exits_75_in_the_grace_period_without_a_lease(demo_models, tmp_path):
    from job.plan import load_plan
    from job.shards import read_shard
    from job.store import LocalStore

    write_reads(tmp_path / "in.fa", 20, seed=2)
    out = tmp_path / "out"
    grace = 30  # the worker's own forced exit would come at 0.8 x 30 = 24 s: the warm-up must beat it
    args = run_args(demo_models, [str(tmp_path / "in.fa")], str(out), "--workers", "1", "--compile",
                    "--grace-seconds", str(grace), cache=tmp_path / "model-cache")
    env = {**subprocess_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # a cold compiler
    job = JobProcess(args, env)
    assert job.wait_for("warm_up_started", timeout=180) is not None, job.log_text
    time.sleep(0.5)  # inside the first shape's compilation
    stopped = time.monotonic()
    job.process.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 75, job.log_text
    assert time.monotonic() - stopped < grace, "the warm-up did not stop within the grace period"
    events = [e["event"] for e in job.events]
    assert "shard_claimed" not in events and "killing_workers" not in events, job.log_text
    assert "engine_ready" not in events
    messages = [e.get("message", "") for e in job.events if e["event"] == "worker_stopped"]
    assert any("during the warm-up" in m for m in messages), job.log_text  # returned, not forced out
    store = LocalStore(str(out))
    plan = load_plan(store)
    if plan is not None:
        for shard in plan.shards:
            state = read_shard(store, shard.index)[0]
            assert state.owner is None and state.attempt == 0 and state.reads_done == 0


# --- the parent's checksums -------------------------------------------------------------------


def test_a_model_checksum_is_remembered_while_its_files_keep_their_size_and_time(models, tmp_path, monkeypatch):
    import job.models

    hashed: list[str] = []
    real = job.models._sha256_file
    monkeypatch.setattr(job.models, "_sha256_file", lambda path: hashed.append(path.name) or real(path))
    memo = tmp_path / "digests"
    for source in models.values():
        old = time.time() - 60  # written a minute ago: no rewrite can hide in the clock tick
        for file in [source, *source.rglob("*")]:
            os.utime(file, (old, old))
    for source in models.values():
        expected = sha256_path(source)
        hashed.clear()
        assert job.models.remembered_sha256(source, memo) == expected and hashed  # hashed once
        hashed.clear()
        assert job.models.remembered_sha256(source, memo) == expected and not hashed  # remembered
    esm = models["esm"]
    before = job.models.remembered_sha256(esm, memo)
    size = esm.stat().st_size
    write_demo_checkpoint(esm, seed=1)  # new weights, the same size, a new time
    assert esm.stat().st_size == size
    changed = job.models.remembered_sha256(esm, memo)
    assert changed == sha256_path(esm) != before
    hashed.clear()
    assert job.models.remembered_sha256(esm, memo) == changed and hashed  # just written: not remembered yet


def test_a_fair_esm_model_name_is_fetched_once_into_the_hub_cache(models, tmp_path, monkeypatch):
    """`--esm-model esm2_t36_3B_UR50D`: downloaded by the job (never by core) where fair-esm
    keeps it, then read from there with no network; offline, a clear error and no partial file."""
    import urllib.error
    import urllib.request

    from job.models import localize_model

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ModelLoadError) as raised:
        localize_model("esm2_t36_3B_UR50D", str(tmp_path / "cache"), None)
    assert "esm2_t36_3B_UR50D" in str(raised.value) and "local path" in str(raised.value)
    assert list((hub / "checkpoints").iterdir()) == []  # no partial download left

    class Site:  # serves the demo checkpoint in blocks, as the site would serve the real one
        cut = False  # the connection closes after 1,000 bytes (the size announced all the same)

        def __init__(self, url, timeout):
            assert url == "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t2_1M_UR50D.pt" and timeout > 0
            self.body = models["esm"].read_bytes()
            self.headers = {"Content-Length": str(len(self.body))}
            if self.cut:
                self.body = self.body[:1000]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, size):
            block, self.body = self.body[:size], self.body[size:]
            return block

    monkeypatch.setattr(urllib.request, "urlopen", Site)
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Interrupted):
        localize_model("esm2_t2_1M_UR50D", str(tmp_path / "cache"), None, stopped)
    assert list((hub / "checkpoints").iterdir()) == []
    Site.cut = True
    with pytest.raises(ModelLoadError, match="ended after 1,000 of .* bytes; run again"):
        localize_model("esm2_t2_1M_UR50D", str(tmp_path / "cache"), None)
    assert list((hub / "checkpoints").iterdir()) == []  # a short file never passes for the model
    Site.cut = False
    fetched = localize_model("esm2_t2_1M_UR50D", str(tmp_path / "cache"), None)
    assert Path(fetched.path) == hub / "checkpoints" / "esm2_t2_1M_UR50D.pt"
    assert fetched.identity() == {"name": "esm2_t2_1M_UR50D"}  # the plan records the name, as before
    assert Path(fetched.path).read_bytes() == models["esm"].read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert localize_model("esm2_t2_1M_UR50D", str(tmp_path / "cache"), None).path == fetched.path
    torch.testing.assert_close(load_esm2(fetched.path, CPU).embed(PROTEINS[:2]),
                               load_esm2(str(models["esm"]), CPU).embed(PROTEINS[:2]))


def test_a_local_model_is_checksummed_through_the_memo(models, tmp_path):
    from job.models import localize_model

    model = localize_model(str(models["esm"]), str(tmp_path / "cache"), None)
    assert model.sha256 == sha256_path(models["esm"])


def test_an_s3_download_stops_when_asked_and_leaves_no_copy_and_stale_copies_go(bucket, tmp_path):  # noqa: F811
    import boto3

    import job.models
    from job.errors import Interrupted
    from job.models import localize_model

    body = os.urandom(3 * 2**20)
    boto3.client("s3").put_object(Bucket=bucket, Key="models/m.pt", Body=body)
    uri, cache = f"s3://{bucket}/models/m.pt", tmp_path / "cache"
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted, match=f"stopped while downloading {uri}"):
        localize_model(uri, str(cache), None, stop)
    assert list(cache.iterdir()) == []  # the staging directory went with the stop
    entry = job.models.hashlib.sha256(uri.encode()).hexdigest()[:16]
    killed, live = cache / f".{entry}.killed", cache / f".{entry}.live"  # left by a killed download / being written
    for staging in (killed, live):
        staging.mkdir()
        (staging / "m.pt").write_bytes(b"part")
    hour_ago = time.time() - job.models.STALE_STAGING_SECONDS - 60
    os.utime(killed / "m.pt", (hour_ago, hour_ago))
    model = localize_model(uri, str(cache), None, threading.Event())
    assert Path(model.path).read_bytes() == body and not killed.exists() and live.exists()


def test_the_predictor_loads_both_encoders_from_their_caches_at_once(demo_models, tmp_path):
    import shutil

    from core.pipeline import load_predictor

    esm, dnabert = tmp_path / "esm.pt", tmp_path / "dnabert"
    shutil.copy(demo_models / "esm2_demo.pt", esm)
    shutil.copytree(demo_models / "dnabert_demo", dnabert)
    caches = {"esm_cache": WeightsCache(tmp_path / "converted", sha256_path(esm)),
              "dnabert_cache": WeightsCache(tmp_path / "converted", sha256_path(dnabert))}
    classifier = str(demo_models / "classifier_500.pth")
    first = load_predictor(str(esm), str(dnabert), classifier, device="cpu", **caches)
    assert (first.esm.loaded_from, first.dnabert.loaded_from) == ("source (cached now)", "source (cached now)")
    hidden(esm), hidden(dnabert)
    second = load_predictor(str(esm), str(dnabert), classifier, device="cpu", **caches)
    assert (second.esm.loaded_from, second.dnabert.loaded_from) == ("cache", "cache")
    assert torch.equal(second.esm.embed(PROTEINS), first.esm.embed(PROTEINS))
    assert torch.equal(second.dnabert.embed(DNA), first.dnabert.embed(DNA))


def test_converted_weights_written_in_the_background(models, tmp_path):
    from job.model_cache import finish_writes

    source = models["esm"]
    cache = WeightsCache(tmp_path / "converted", sha256_path(source), in_background=True)
    first = load_esm2(str(source), CPU, cache=cache)
    assert first.loaded_from == "source (caching)"
    assert finish_writes(timeout=120)
    hidden(source)
    again = load_esm2(str(source), CPU, cache=cache)
    assert again.loaded_from == "cache" and torch.equal(again.embed(PROTEINS), first.embed(PROTEINS))
    assert again.model.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()  # still tied


def test_a_shard_claimed_as_the_stop_arrives_is_given_back(tmp_path, monkeypatch):
    import job.worker
    from job.plan import load_plan
    from job.shards import read_shard
    from job.worker import Worker, WorkerSpec
    from test_job_worker import FakePredictor, make_run

    run, store = make_run(tmp_path, 10, shard_reads=10)
    stop = threading.Event()
    real_claim = job.worker.claim

    def claim_then_stop(*args, **kwargs):  # the SIGTERM lands while the claim is on its way
        lease = real_claim(*args, **kwargs)
        stop.set()
        return lease

    monkeypatch.setattr(job.worker, "claim", claim_then_stop)
    predictor = FakePredictor(5)
    assert Worker(WorkerSpec(run, 0, 1, 0), store, load_plan(store), predictor, "cpu", stop).run() == 75
    assert predictor.group_sizes == []  # nothing scored
    state = read_shard(store, 0)[0]
    assert state.owner is None and state.reads_done == 0 and state.errors == ()


def test_read_ahead_reads_the_converted_weights_of_these_models_only(tmp_path: Path, monkeypatch) -> None:
    import job.models
    from core import dnabert, esm2

    converted = tmp_path / "cache" / "converted"
    converted.mkdir(parents=True)
    esm, dna, other = "a" * 64, "b" * 64, "c" * 64
    # named as the encoders name them: read_ahead must find what WeightsCache writes
    wanted = [WeightsCache(converted, dna).path(dnabert.CACHE_NAME, torch.float16),
              WeightsCache(converted, esm).path(esm2.CACHE_NAME, torch.float16)]
    unwanted = [WeightsCache(converted, other).path(esm2.CACHE_NAME, torch.float16)]
    for path in [*wanted, *unwanted, converted / f".{wanted[1].name}.lock"]:
        path.write_bytes(b"x" * 100)
    read: list[Path] = []
    real = job.models._read_through
    monkeypatch.setattr(job.models, "_read_through", lambda files: (read.extend(files), real(files)))
    job.models.read_ahead(str(tmp_path / "cache"), [{"sha256": esm}, {"sha256": dna}, {"name": "hub-id"}]).join(10)
    assert sorted(p.name for p in read) == sorted(p.name for p in wanted)
    job.models.read_ahead(str(tmp_path / "nowhere"), [{"sha256": esm}]).join(10)  # no cache yet: nothing to read


@pytest.mark.parametrize(("visible", "expected"), [(None, ["0", "1"]), ("1", ["1"]), ("", []), ("GPU-9,0,1", ["GPU-9", "0"])])
def test_the_job_counts_gpus_with_nvml_and_honours_cuda_visible_devices(monkeypatch, visible, expected) -> None:
    import pynvml

    import job.batch
    from job.config import RunConfig

    calls: list[str] = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 2)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: calls.append("shutdown"))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    config = RunConfig(inputs=("in.fa",), output="out", esm_model="-", dnabert_model="-", classifier="-")
    assert job.batch._visible_gpus(config) == expected
    assert calls == ["init", "shutdown"]
    assert job.batch._visible_gpus(RunConfig(**{**config.__dict__, "device": "cpu"})) == []

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    assert job.batch._visible_gpus(config) == []


def test_the_models_checks_are_remembered_by_the_models_sha256(demo_models: Path, tmp_path: Path, monkeypatch) -> None:
    import core.pipeline
    from job.models import LocalModel, checked_models, localize_model

    cache = str(tmp_path / "cache")
    models = {name: localize_model(str(demo_models / file), cache, None) for name, file in
              (("esm_model", "esm2_demo.pt"), ("dnabert_model", "dnabert_demo"), ("classifier", "classifier_500.pth"))}
    checks: list[tuple] = []
    real = core.pipeline.check_models
    monkeypatch.setattr(core.pipeline, "check_models", lambda *args: (checks.append(args), real(*args))[1])
    answer = checked_models(models, None, False, cache)
    assert answer == (500, 128, True) and len(checks) == 1
    assert checked_models(models, None, False, cache) == answer and len(checks) == 1  # remembered
    assert checked_models(models, 300, True, cache) == (300, 128, True) and len(checks) == 2  # other arguments
    other = {**models, "classifier": LocalModel("c", models["classifier"].path, "f" * 64)}
    checked_models(other, None, False, cache)
    assert len(checks) == 3  # other bytes
    by_name = {**models, "esm_model": LocalModel("esm2_demo", models["esm_model"].path, None)}
    checked_models(by_name, None, False, cache)
    checked_models(by_name, None, False, cache)
    assert len(checks) == 5  # a model known by name only is checked every time
    for memo in (tmp_path / "cache" / "checked").glob("*.json"):
        memo.write_text("{not json")
    assert checked_models(models, None, False, cache) == answer and len(checks) == 6  # a damaged memo: checked again
