"""entrypoint.sh run as a plain process, with a fake `virnucpro` first on PATH.

The fake records its argv and PID, then either exits with a chosen code or waits for
SIGTERM, writes a marker and exits 75 the way the real job does after its flush.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parent.parent / "entrypoint.sh"

FAKE_JOB = textwrap.dedent(
    """\
    #!{python}
    import json, os, signal, sys, time
    from pathlib import Path

    state = Path(os.environ["FAKE_STATE"])

    def on_sigterm(signum, frame):
        (state / "sigterm").write_text("flushed")
        sys.exit(75)

    signal.signal(signal.SIGTERM, on_sigterm)
    (state / "call.json").write_text(json.dumps({{"argv": sys.argv[1:], "pid": os.getpid(), "ppid": os.getppid()}}))
    if os.environ.get("FAKE_WAIT"):
        (state / "ready").touch()
        while True:
            time.sleep(0.05)
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
    """
)

REQUIRED = {
    "INPUT_URI": "s3://bucket/inputs/a.fastq.gz",
    "OUTPUT_URI": "s3://bucket/runs/r1/",
    "ESM_MODEL_URI": "s3://bucket/models/esm2_t36_3B_UR50D.pt",
    "DNABERT_MODEL_URI": "s3://bucket/models/DNABERT-S",
    "CLASSIFIER_URI": "s3://bucket/models/500_model.pth",
}

SECRETS = ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A folder holding the fake `virnucpro` (bin/) and what it records."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "virnucpro"
    fake.write_text(FAKE_JOB.format(python=sys.executable))
    fake.chmod(0o755)
    return tmp_path


def job_env(state: Path, **overrides: str | None) -> dict[str, str]:
    """A minimal environment with every required variable; None removes a variable."""
    env = {
        "PATH": f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "FAKE_STATE": str(state),
        **REQUIRED,
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run(state: Path, *args: str, **overrides: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args],
        env=job_env(state, **overrides),
        capture_output=True,
        text=True,
        timeout=30,
    )


def recorded_argv(state: Path) -> list[str]:
    return json.loads((state / "call.json").read_text())["argv"]


BASE_FLAGS = [
    "--output", REQUIRED["OUTPUT_URI"],
    "--esm-model", REQUIRED["ESM_MODEL_URI"],
    "--dnabert-model", REQUIRED["DNABERT_MODEL_URI"],
    "--classifier", REQUIRED["CLASSIFIER_URI"],
]  # fmt: skip


def test_environment_maps_to_run_flags(state: Path) -> None:
    result = run(
        state,
        INPUT_URI=" s3://bucket/inputs/a.fastq.gz  s3://bucket/inputs/*.fa\n/data/c.fa ",
        CHUNK_LENGTH="500",
    )
    assert result.returncode == 0, result.stderr
    assert recorded_argv(state) == [
        "run",
        "--input", "s3://bucket/inputs/a.fastq.gz", "s3://bucket/inputs/*.fa", "/data/c.fa",
        *BASE_FLAGS,
        "--chunk-length", "500",
    ]  # fmt: skip


def test_chunk_length_is_optional(state: Path) -> None:
    result = run(state)
    assert result.returncode == 0, result.stderr
    assert recorded_argv(state) == ["run", "--input", REQUIRED["INPUT_URI"], *BASE_FLAGS]


def test_extra_args_then_command_line_args_pass_through(state: Path) -> None:
    result = run(state, "--slots", "4", "--device", "cuda", EXTRA_ARGS="--shard-reads 5000  --write-features")
    assert result.returncode == 0, result.stderr
    assert recorded_argv(state) == [
        "run", "--input", REQUIRED["INPUT_URI"], *BASE_FLAGS,
        "--shard-reads", "5000", "--write-features",
        "--slots", "4", "--device", "cuda",
    ]  # fmt: skip


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_missing_required_variable_is_bad_input(state: Path, name: str, value: str | None) -> None:
    result = run(state, **{name: value})
    assert result.returncode == 65
    assert name in result.stderr
    assert not (state / "call.json").exists(), "the job must not start"


def test_input_uri_of_only_whitespace_is_bad_input(state: Path) -> None:
    result = run(state, INPUT_URI=" \n\t ")
    assert result.returncode == 65
    assert "INPUT_URI" in result.stderr
    assert not (state / "call.json").exists()


@pytest.mark.parametrize("code", [1, 3, 65])
def test_job_exit_code_comes_back_unchanged(state: Path, code: int) -> None:
    assert run(state, FAKE_EXIT=str(code)).returncode == code


TINI = shutil.which("tini")


@pytest.mark.parametrize(
    "under_tini",
    [False, pytest.param(True, marks=pytest.mark.skipif(TINI is None, reason="tini not installed"))],
    ids=["plain", "tini"],
)
def test_sigterm_reaches_the_job_and_75_comes_back(state: Path, under_tini: bool) -> None:
    """Plain: the job replaces the shell (exec), same PID. Under tini (the image's
    ENTRYPOINT) tini is the job's parent and forwards the signal."""
    launcher = [TINI, "--"] if under_tini else []
    proc = subprocess.Popen(
        [*launcher, str(ENTRYPOINT)],
        env=job_env(state, FAKE_WAIT="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not (state / "ready").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the fake job never started"
            time.sleep(0.02)
        call = json.loads((state / "call.json").read_text())
        assert call["ppid" if under_tini else "pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert (state / "sigterm").read_text() == "flushed"


def test_secrets_never_reach_stdout_or_stderr(state: Path) -> None:
    secret_env = {
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": SECRETS[0],
        "AWS_SESSION_TOKEN": SECRETS[1],
    }
    presigned = f"https://bucket.s3.amazonaws.com/inputs/a.fa?X-Amz-Security-Token={SECRETS[1]}"
    args = (
        "--s3-endpoint-url", f"https://minio:{SECRETS[0]}@minio.local:9000",
        "--aws-secret-access-key", SECRETS[0],
        f"--session-token={SECRETS[1]}",
    )  # fmt: skip
    ok = run(state, *args, INPUT_URI=presigned, **secret_env)
    missing = run(state, *args, OUTPUT_URI=None, **secret_env)

    assert ok.returncode == 0, ok.stderr
    assert missing.returncode == 65
    # The job still gets every argument as given: only the log is redacted.
    assert presigned in recorded_argv(state)
    assert SECRETS[0] in recorded_argv(state)
    assert "--s3-endpoint-url" in ok.stderr  # the command line is logged, minus secrets
    for result in (ok, missing):
        for secret in (*SECRETS, secret_env["AWS_ACCESS_KEY_ID"]):
            assert secret not in result.stdout + result.stderr
