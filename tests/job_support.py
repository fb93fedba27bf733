"""Test helpers for the batch job: a moto S3 server, a fault-injecting proxy, a fake IMDS.

The moto server handles one request at a time once its body has arrived: moto's
conditional writes check and store in two steps, which only serial handling makes atomic
(as S3 itself is), and reading bodies outside the lock keeps a stopped client (SIGSTOP in
the middle of a request) from stalling everyone else.
"""
from __future__ import annotations

import http.client
import io
import logging
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from werkzeug.serving import make_server

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

REPO = Path(__file__).resolve().parents[1]
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class _Serving:
    """A server running in a daemon thread."""

    def __init__(self, server) -> None:  # noqa: ANN001
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, daemon=True)
        self.thread.start()
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _OneAtATime:
    """WSGI middleware: read the request, then handle it under a global lock."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response):  # noqa: ANN204
        stream = environ["wsgi.input"]
        if environ.get("wsgi.input_terminated"):
            body = stream.read()
        else:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = stream.read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        with self.lock:
            return list(self.app(environ, start_response))


def start_moto() -> _Serving:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = _OneAtATime(DomainDispatcherApplication(create_backend_app))
    return _Serving(make_server("127.0.0.1", 0, app, threaded=True))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server; the AWS_* test credentials and the endpoint are in os.environ."""
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    server = start_moto()
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=server.url)
    yield server.url
    server.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


class FaultProxy:
    """An HTTP proxy in front of S3 that answers a seeded share of requests with 503/500.

    Faulted requests never reach the server, as with a throttling front end, so a retry is
    the first time the request is seen.
    """

    ERRORS = [
        (503, "SlowDown", "Please reduce your request rate."),
        (500, "InternalError", "We encountered an internal error. Please try again."),
        (503, "ServiceUnavailable", "Service is unable to handle request."),
    ]

    def __init__(self, upstream: str, fault_rate: float, seed: int) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.fault_rate = fault_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.requests = self.faults = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.requests += 1
                    fault = proxy.random.random() < proxy.fault_rate
                    proxy.faults += fault
                    status, code, message = proxy.random.choice(proxy.ERRORS)
                if fault:
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>fault</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "content-length", "connection", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length", 0) or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.serving = _Serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        self.url = self.serving.url

    def close(self) -> None:
        self.serving.close()


class FakeIMDS:
    """An EC2 metadata service: IMDSv2 token, then 404 until `notice()`, then an instance-action."""

    def __init__(self) -> None:
        self.action: bytes | None = None
        self.token_requests = 0
        imds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_PUT(self) -> None:
                imds.token_requests += 1
                self._reply(200, b"token-123") if self.path == "/latest/api/token" else self._reply(404, b"")

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != "token-123":
                    self._reply(401, b"")
                elif self.path == "/latest/meta-data/spot/instance-action" and imds.action:
                    self._reply(200, imds.action)
                else:
                    self._reply(404, b"")

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.serving = _Serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler))
        self.url = self.serving.url

    def notice(self) -> None:
        self.action = b'{"action": "terminate", "time": "2026-11-23T16:00:00Z"}'

    def close(self) -> None:
        self.serving.close()


def virnucpro(*args: str) -> list[str]:
    """argv running the CLI in a fresh interpreter."""
    return [sys.executable, "-m", "job.cli", *args]


LOOPBACK_ONLY = Path(__file__).resolve().parent / "loopback_only"  # its sitecustomize guards sockets


def subprocess_env(endpoint: str | None = None) -> dict[str, str]:
    env = dict(os.environ, **AWS_ENV, PYTHONPATH=os.pathsep.join([str(LOOPBACK_ONLY), str(REPO)]))
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


STOPS = {"TAA", "TAG", "TGA"}
CODONS = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT" if a + b + c not in STOPS]


def write_reads(path: Path, count: int, seed: int, repeats: float = 0.0) -> list[str]:
    """A FASTA of `count` reads, most with an open frame, plus the awkward cases; returns the ids.

    Includes an empty record, a 2 bp read, a repeated id, invalid characters and lowercase.
    With `repeats`, that share of the reads after the first 12 copy an earlier read's letters
    (under their own ids), as duplicates in sequencing data do.
    """
    rng = random.Random(seed)
    ids, lines, sequences = [], [], []
    for n in range(count):
        length = rng.choice([90, 150, 300, 480, 501, 700, 1100])
        if rng.random() < 0.75:
            sequence = "".join(rng.choice(CODONS) for _ in range(length // 3))
        else:
            sequence = "".join(rng.choice("ACGT") for _ in range(length))
        if repeats and n > 12 and rng.random() < repeats:
            sequence = rng.choice(sequences[12:])
        sequences.append(sequence)
        read_id = f"read{n:04d}"
        if n == 3:
            sequence = ""
        elif n == 5:
            sequence = "AC"
        elif n == 7:
            read_id = "read0001"  # a repeat
        elif n == 9:
            sequence = sequence[:40] + "-" + sequence[40:]
        elif n == 11:
            sequence = sequence.lower()
        ids.append(read_id)
        lines.append(f">{read_id} sample read {n}\n")
        lines.extend(sequence[i:i + 70] + "\n" for i in range(0, len(sequence), 70))
    path.write_text("".join(lines))
    return ids


FINAL_FILES = ("prediction_results.txt", "prediction_results_highestscore.csv", "reads.tsv")


def same_reads(name: str, data: bytes | None) -> bytes | None:
    """A final file as compared between runs over the same reads from differently named
    inputs: reads.tsv without its last column (the input's URI), the others as they are."""
    if name != "reads.tsv" or data is None:
        return data
    return b"".join(line.rsplit(b"\t", 1)[0] + b"\n" for line in data.splitlines())


def read_output(output: str, name: str) -> bytes | None:
    """A final file of a run (local directory or s3:// prefix), or None when it is missing."""
    if output.startswith("s3://"):
        bucket_name, _, prefix = output.removeprefix("s3://").partition("/")
        client = boto3.client("s3")
        try:
            return client.get_object(Bucket=bucket_name, Key=f"{prefix}/{name}")["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
    path = Path(output) / name
    return path.read_bytes() if path.exists() else None


def run_args(models: Path, inputs: list[str], output: str, *extra: str, cache: Path | None = None) -> list[str]:
    """`virnucpro run` with demo models and small, quick batch-job settings."""
    args = [
        "run", "--input", *inputs, "--output", output,
        "--esm-model", str(models / "esm2_demo.pt"), "--dnabert-model", str(models / "dnabert_demo"),
        "--classifier", str(models / "classifier_500.pth"), "--device", "cpu",
        "--workers", "2", "--shard-reads", "30", "--group-reads", "6",
        "--checkpoint-seconds", "0.2", "--lease-seconds", "3", "--grace-seconds", "10",
        "--imds-url", "http://127.0.0.1:9",
    ]
    if cache is not None:
        args += ["--model-cache", str(cache)]
    return virnucpro(*args, *extra)


class JobProcess:
    """A `virnucpro` subprocess whose JSON log lines (stderr) are collected as they come."""

    def __init__(self, args: list[str], env: dict[str, str], stdin: int | None = None, own_group: bool = False) -> None:
        """`own_group`: the job leads a process group of its own, as a shell's foreground job
        does (a terminal's Ctrl-C goes to the whole group)."""
        self.process = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=env, start_new_session=own_group)
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            with self._changed:
                self.stderr.append(line)
                if line.startswith("{"):
                    try:
                        self.events.append(json.loads(line))
                    except ValueError:
                        pass
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, event: str, timeout: float = 120, count: int = 1) -> dict | None:
        """The `count`-th log event named `event`, or None if the job ended first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self.events if e.get("event") == event]
                if len(found) >= count:
                    return found[count - 1]
                if not self._reader.is_alive() or time.monotonic() > deadline:
                    return None
                self._changed.wait(0.1)

    def worker_pids(self) -> list[int]:
        """PIDs of the job's worker processes (its children)."""
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in children.split()]

    def wait(self, timeout: float = 240) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def log_text(self) -> str:
        return "".join(self.stderr)
