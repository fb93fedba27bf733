"""Spot interruption notices from the EC2 instance metadata service (IMDSv2).

On a spot instance AWS announces a reclaim about two minutes ahead at
/latest/meta-data/spot/instance-action. The watcher polls it every few seconds and calls
`on_notice` once, which stops the run as SIGTERM would.

The metadata service is asked only where one can exist: `--imds-url auto` (the default)
polls only on EC2, as the machine's firmware reports it (DMI vendor, or a hypervisor or
product UUID starting with "ec2"), or inside AWS Batch, ECS or EKS (their environment
variables). On a laptop or a CI runner the job sends no request at all. An explicit URL is
always polled; there, off EC2, the token request fails within a second and the watcher ends
without a word.
"""
from __future__ import annotations

import json
import os
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

AUTO = "auto"
EC2_METADATA_URL = "http://169.254.169.254"
DMI_DIR = "/sys/class/dmi/id"
HYPERVISOR_UUID = "/sys/hypervisor/uuid"
# Set by the AWS platforms that run containers on EC2 instances (IRSA and Pod Identity: EKS).
AWS_PLATFORM_VARIABLES = (
    "AWS_BATCH_JOB_ID",
    "ECS_CONTAINER_METADATA_URI",
    "ECS_CONTAINER_METADATA_URI_V4",
    "AWS_EXECUTION_ENV",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


def metadata_url(setting: str, environ: dict[str, str] | None = None, dmi_dir: str = DMI_DIR,
                 hypervisor_uuid: str = HYPERVISOR_UUID) -> str | None:
    """The metadata service to poll for `--imds-url setting`, or None: nothing to poll.

    An explicit URL is returned as it is; "auto" gives the EC2 one only where it can exist.
    """
    if setting != AUTO:
        return setting
    environ = os.environ if environ is None else environ
    if any(environ.get(name) for name in AWS_PLATFORM_VARIABLES) or _ec2_firmware(dmi_dir, hypervisor_uuid):
        return EC2_METADATA_URL
    return None


def _ec2_firmware(dmi_dir: str, hypervisor_uuid: str) -> bool:
    """Nitro instances name Amazon EC2 as vendor; older Xen ones have UUIDs starting with ec2."""
    def read(path: str) -> str:
        try:
            with open(path, encoding="ascii", errors="replace") as file:
                return file.read().strip().lower()
        except OSError:  # absent (not Linux, no DMI) or unreadable (product_uuid is root-only)
            return ""

    vendors = (read(os.path.join(dmi_dir, name)) for name in ("sys_vendor", "board_vendor"))
    uuids = (read(os.path.join(dmi_dir, "product_uuid")), read(hypervisor_uuid))
    return any(vendor == "amazon ec2" for vendor in vendors) or any(u.startswith("ec2") for u in uuids)


class SpotWatcher(threading.Thread):
    def __init__(self, imds_url: str, on_notice: Callable[[], None]) -> None:
        """`imds_url`: a URL, or "auto" (see metadata_url); None resolved means no polling."""
        super().__init__(daemon=True, name="spot-watcher")
        url = metadata_url(imds_url)
        self.base_url = url.rstrip("/") if url is not None else None
        self.on_notice = on_notice
        self._stopped = threading.Event()
        # The metadata service is link-local: never go through an HTTP(S)_PROXY.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def run(self) -> None:
        if self.base_url is None:
            return  # no metadata service can exist here: ask nothing
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
            if self._stopped.wait(POLL_SECONDS):
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
