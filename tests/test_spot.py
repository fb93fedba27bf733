"""The spot-notice poller asks the EC2 metadata service only where one can exist.

The demo run is checked in a subprocess with an audit hook that refuses (and reports) every
socket connection to 169.254.169.254, so no packet ever leaves even when the check fails.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from job.spot import AWS_PLATFORM_VARIABLES, EC2_METADATA_URL, metadata_url

ROOT = Path(__file__).resolve().parent.parent

# Runs the commands given as JSON argv lists through job.cli.main with every connection to
# the metadata address refused; prints IMDS_CONNECT for each attempt.
GUARDED_MAIN = r"""
import json, sys
def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] == "169.254.169.254":
        print("IMDS_CONNECT", args[1], file=sys.stderr, flush=True)
        raise OSError("test: the metadata service must not be asked here")
sys.addaudithook(hook)
from job.cli import main
from job.spot import SpotWatcher
for argv in json.loads(sys.argv[1]):
    if argv == ["spot-watcher"]:
        SpotWatcher("auto", lambda: None).run()
        continue
    code = main(argv)
    if code:
        sys.exit(code)
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AWS_PLATFORM_VARIABLES}
    return dict(env, PYTHONPATH=str(ROOT), **extra)


def guarded(commands: list[list[str]], env: dict[str, str]) -> subprocess.CompletedProcess:
    import json

    return subprocess.run([sys.executable, "-c", GUARDED_MAIN, json.dumps(commands)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def dmi(tmp_path: Path, **files: str) -> str:
    for name, text in files.items():
        (tmp_path / name).write_text(text + "\n")
    return str(tmp_path)


@pytest.mark.skipif(metadata_url("auto") is not None, reason="this machine is on EC2 (or AWS env set)")
def test_readme_demo_command_never_asks_the_metadata_service(tmp_path: Path) -> None:
    models, out = tmp_path / "demo-models", tmp_path / "demo-out"
    # The README's demo command, as it is written there (no --imds-url).
    demo = ["run", "--input", "examples/reads.fa", "--output", str(out), "--esm-model", f"{models}/esm2_demo.pt",
            "--dnabert-model", f"{models}/dnabert_demo", "--classifier", f"{models}/classifier_500.pth",
            "--write-features"]
    result = guarded([["make-demo-models", str(models)], demo], clean_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMDS_CONNECT" not in result.stderr
    assert (out / "_SUCCESS").exists()


def test_guard_sees_the_watcher_where_aws_says_it_runs() -> None:
    """The same guard catches the poller once the environment says ECS: the check above can fail."""
    result = guarded([["spot-watcher"]], clean_env(AWS_EXECUTION_ENV="AWS_ECS_EC2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IMDS_CONNECT" in result.stderr


def test_auto_polls_nothing_off_ec2(tmp_path: Path) -> None:
    laptop = dmi(tmp_path, sys_vendor="LENOVO", board_vendor="LENOVO", product_uuid="4c4c4544-0042")
    assert metadata_url("auto", {}, laptop, str(tmp_path / "no-hypervisor")) is None
    assert metadata_url("auto", {"HOME": "/root"}, str(tmp_path / "no-dmi"), str(tmp_path / "none")) is None


@pytest.mark.parametrize("files", [
    {"sys_vendor": "Amazon EC2"},
    {"board_vendor": "Amazon EC2"},
    {"sys_vendor": "Xen", "product_uuid": "EC2E1916-9099-7CAF-FD21-012345678901"},
])
def test_auto_polls_on_ec2_firmware(tmp_path: Path, files: dict[str, str]) -> None:
    assert metadata_url("auto", {}, dmi(tmp_path, **files), str(tmp_path / "none")) == EC2_METADATA_URL


def test_auto_polls_on_old_xen_instances(tmp_path: Path) -> None:
    (tmp_path / "uuid").write_text("ec2e1916-9099-7caf-fd21-012345678901\n")
    assert metadata_url("auto", {}, str(tmp_path / "no-dmi"), str(tmp_path / "uuid")) == EC2_METADATA_URL


@pytest.mark.parametrize("variable", AWS_PLATFORM_VARIABLES)
def test_auto_polls_inside_aws_platforms(tmp_path: Path, variable: str) -> None:
    assert metadata_url("auto", {variable: "x"}, str(tmp_path), str(tmp_path / "none")) == EC2_METADATA_URL


def test_an_explicit_url_is_always_polled(tmp_path: Path) -> None:
    assert metadata_url("http://127.0.0.1:9", {}, str(tmp_path), str(tmp_path / "none")) == "http://127.0.0.1:9"
