"""Live progress (issue 15): a bar for a person at a terminal, JSON lines for batch platforms."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from job_support import run_args, subprocess_env, virnucpro, write_reads

BAR = re.compile(r"\w+ (running|_SUCCESS): +\d+%\|[^|]*\| \d+/\d+ reads \[[-\d.]+ reads/s, ETA [-\d:]+\]")


def test_a_terminal_gets_a_progress_bar_and_status_prints_the_same_line(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 60, seed=5)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "out")),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower, env=subprocess_env(),
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # every writer closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None and not select.select([leader], [], [], 0.5)[0]:
            break
    os.close(leader)
    assert process.wait(timeout=60) == 0
    text = seen.decode(errors="replace")
    screens = [part.replace("\x1b[K", "") for part in re.split(r"[\r\n]", text) if part.strip()]
    bars = [line for line in screens if BAR.search(line)]
    assert bars, text  # the bar was drawn
    assert any("100%" in line and "60/60 reads" in line for line in bars), text
    assert not [line for line in screens if line.lstrip().startswith("{")], text  # no JSON lines
    assert "demo models in use" in text  # warnings still shown, as readable lines
    json.loads(process.stdout.read())  # the run's summary still goes to stdout

    status = subprocess.run(virnucpro("status", "--output", str(tmp_path / "out")), capture_output=True, text=True,
                            env=subprocess_env(), timeout=120)
    first, second = status.stdout.splitlines()[:2]
    assert BAR.search(first) and "_SUCCESS" in first and "100%" in first and "60/60 reads" in first
    assert "shards 2 done" in second


def test_without_a_terminal_only_json_lines(demo_models: Path, tmp_path: Path) -> None:
    write_reads(tmp_path / "in.fa", 20, seed=6)
    done = subprocess.run(
        run_args(demo_models, [str(tmp_path / "in.fa")], str(tmp_path / "out"), "--log-format", "auto"),
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON event
    assert {"run_planned", "part_committed", "run_finished"} <= {event["event"] for event in events}
    assert not BAR.search(done.stderr)


def test_core_warnings_through_the_standard_library_come_out_as_json_lines(capsys) -> None:  # noqa: ANN001
    """core/ logs with the standard library (the compile fallback, say); the job's log stream
    stays one JSON event per line, infos of other libraries left out."""
    import logging

    from job.log import configure

    configure("json")
    configure("json")  # configured twice (a test, a re-entry): still one line per record
    logging.getLogger("core.engine").warning("torch.compile failed for %s", "_post_attention")
    logging.getLogger("some.library").info("chatter")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    event = json.loads(lines[0])
    assert event["event"] == "torch.compile failed for _post_attention"
    assert event["logger"] == "core.engine" and event["level"] == "warning"


def test_a_look_that_outlives_the_run_draws_nothing_after_the_bar_is_ended(capsys) -> None:  # noqa: ANN001
    """A stopped run ends the bar's line at once; a look still reading shards then (half a
    minute at 10^8 reads) drew the bar again below the run's last words."""
    from job.batch import _Progress
    from job.log import get_logger

    looking, answer = threading.Event(), threading.Event()

    class SlowWatch:
        def look(self) -> SlowWatch:
            looking.set()
            answer.wait(10)
            return self

        def bar(self, width: int) -> str:
            return "the bar"

        def close(self) -> None:
            pass

    progress = _Progress(SlowWatch(), bar=True, log=get_logger())
    progress.start()
    assert looking.wait(10)
    progress.finish(last_look=False)  # stopped: no waiting on the look
    print("virnucpro: stopped", file=sys.stderr)
    answer.set()
    progress.join(10)
    err = capsys.readouterr().err
    assert err == "\nvirnucpro: stopped\n", repr(err)
