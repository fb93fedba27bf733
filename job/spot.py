"""Spot interruption notices from the EC2 instance metadata service (IMDSv2).

On a spot instance AWS announces a reclaim about two minutes ahead at
/latest/meta-data/spot/instance-action. The watcher polls it every few seconds and calls
`on_notice` once, which stops the run as SIGTERM would. Off EC2 the token request fails
within a second and the watcher ends without a word.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

from job.log import get_logger

TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_SECONDS = 21600
POLL_SECONDS = 5.0
TIMEOUT_SECONDS = 1.0


class SpotWatcher(threading.Thread):
    def __init__(self, base_url: str, on_notice: Callable[[], None], poll_seconds: float = POLL_SECONDS) -> None:
        super().__init__(daemon=True, name="spot-watcher")
        self.base_url = base_url.rstrip("/")
        self.on_notice = on_notice
        self.poll_seconds = poll_seconds
        self._stopped = threading.Event()
        # The metadata service is link-local: never go through an HTTP(S)_PROXY.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def run(self) -> None:
        token = self._token()
        if token is None:
            return  # not on EC2 (or IMDS disabled): nothing to watch
        while True:
            notice, status = self._instance_action(token)
            if notice is not None:
                get_logger().warning("spot_interruption_notice", **notice)
                self.on_notice()
                return
            if status == 401:  # the token expired
                token = self._token() or token
            if self._stopped.wait(self.poll_seconds):
                return

    def stop(self) -> None:
        self._stopped.set()

    def _token(self) -> str | None:
        request = urllib.request.Request(
            self.base_url + TOKEN_PATH, method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
        )
        try:
            with self._opener.open(request, timeout=TIMEOUT_SECONDS) as response:
                return response.read().decode()
        except (OSError, urllib.error.URLError):
            return None

    def _instance_action(self, token: str) -> tuple[dict | None, int | None]:
        request = urllib.request.Request(
            self.base_url + ACTION_PATH, headers={"X-aws-ec2-metadata-token": token}
        )
        try:
            with self._opener.open(request, timeout=TIMEOUT_SECONDS) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as exc:
            return None, exc.code  # 404: no interruption scheduled
        except OSError:
            return None, None
        try:
            notice = json.loads(body)
        except ValueError:
            notice = {"body": body}
        return (notice if isinstance(notice, dict) else {"body": body}), 200
