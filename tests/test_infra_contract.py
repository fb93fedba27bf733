"""The container and cloud files agree with the job's contract (exit codes, grace period,
environment). Their syntax and schemas are checked by .ci/lint; this is what lint cannot see."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from job import exit_codes
from job.config import RunConfig

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
CREDENTIAL_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def entrypoint_required_variables() -> set[str]:
    return set(re.findall(r"^require (\w+)", (ROOT / "entrypoint.sh").read_text(), re.MULTILINE))


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load((ROOT / "infra/k8s/indexed-job.yaml").read_text())


def test_indexed_job_slots_match_completions_and_parallelism(job: dict) -> None:
    spec = job["spec"]
    args = spec["template"]["spec"]["containers"][0]["args"]
    slots = int(args[args.index("--slots") + 1])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == slots


def test_indexed_job_failure_policy_follows_exit_codes(job: dict) -> None:
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]["name"]
    rules = spec["podFailurePolicy"]["rules"]
    by_code = {}
    for rule in rules:
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["containerName"] == container
            assert rule["onExitCodes"]["operator"] == "In"
            by_code.update(dict.fromkeys(rule["onExitCodes"]["values"], rule["action"]))
    # 2, 3 and 65 fail their index at once; 75 is not a failure; 1 (no rule) uses the retries.
    assert by_code == {
        exit_codes.USAGE: "FailIndex",
        exit_codes.SHARDS_FAILED: "FailIndex",
        exit_codes.BAD_INPUT: "FailIndex",
        exit_codes.INTERRUPTED: "Ignore",
    }
    assert exit_codes.INTERNAL_ERROR not in by_code
    assert spec["backoffLimitPerIndex"] >= 1  # FailIndex needs it; exit 1 is retried
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert pod["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed"
    assert pod["terminationGracePeriodSeconds"] > RunConfig.grace_seconds


def test_indexed_job_runs_on_spot_gpu_nodes_only(job: dict) -> None:
    pod = job["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    selected = {(e["key"], e["operator"], tuple(e["values"])) for term in terms for e in term["matchExpressions"]}
    assert selected == {("eks.amazonaws.com/capacityType", "In", ("SPOT",)),
                        ("karpenter.sh/capacity-type", "In", ("spot",))}
    assert all(len(term["matchExpressions"]) == 1 for term in terms)  # terms are OR'ed: either label
    tolerated = {t["key"] for t in pod["tolerations"]}
    assert {"nvidia.com/gpu", "eks.amazonaws.com/capacityType", "karpenter.sh/capacity-type"} <= tolerated
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_indexed_job_environment_and_identity(job: dict) -> None:
    pod = job["spec"]["template"]["spec"]
    env = {item["name"] for item in pod["containers"][0]["env"]}
    assert entrypoint_required_variables() <= env
    assert not env & CREDENTIAL_VARIABLES, "credentials come from IRSA, never from the manifest"
    account = yaml.safe_load((ROOT / "infra/k8s/serviceaccount.yaml").read_text())
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]


def test_image_runs_entrypoint_under_tini_as_the_manifest_user(job: dict) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoints = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.MULTILINE)
    assert [json.loads(e) for e in entrypoints] == [["tini", "--", "/app/entrypoint.sh"]]
    users = set(re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE))
    context = job["spec"]["template"]["spec"]["securityContext"]
    assert users == {(str(context["runAsUser"]), str(context["runAsGroup"]))}


def test_batch_job_definition_retries_transient_failures_only() -> None:
    """Spot/host loss, start-up failures, 75 and 1 are retried; 2, 3, 65 fall to the EXIT rule.
    (.ci/terraform evaluates the rules as applied, against more cases.)"""
    job_tf = (ROOT / "infra/terraform/aws-batch/job.tf").read_text()
    rules = re.findall(r"evaluate_on_exit \{\s*(\w+)\s*=\s*\"([^\"]*)\"\s*action\s*=\s*\"(\w+)\"", job_tf)
    assert rules == [
        ("on_status_reason", "Host EC2*", "RETRY"),
        ("on_status_reason", "Task failed to start*", "RETRY"),
        ("on_exit_code", str(exit_codes.INTERRUPTED), "RETRY"),
        ("on_exit_code", str(exit_codes.INTERNAL_ERROR), "RETRY"),
        ("on_reason", "*", "EXIT"),
    ]
    block = re.search(r"job_environment = \{\n(.*?)\n  \}", job_tf, re.DOTALL)
    environment = set(re.findall(r"^\s+([A-Z_]+)\s+=", block.group(1), re.MULTILINE))
    assert not environment & CREDENTIAL_VARIABLES
    # The job definition supplies the models; each submission adds INPUT_URI and OUTPUT_URI.
    assert entrypoint_required_variables() - environment == {"INPUT_URI", "OUTPUT_URI"}


def test_every_container_and_infra_file_is_documented() -> None:
    docs = (ROOT / "README.md").read_text() + (ROOT / "infra/README.md").read_text()
    assert "infra/README.md" in (ROOT / "README.md").read_text()
    files = [ROOT / "Dockerfile", ROOT / "entrypoint.sh", ROOT / ".dockerignore"]
    files += [path for path in (ROOT / "infra").rglob("*") if path.is_file() and ".terraform" not in path.parts
              and not path.name.startswith(".terraform")]
    undocumented = [str(path.relative_to(ROOT)) for path in files if path.name not in docs]
    assert not undocumented, f"name these in README.md or infra/README.md: {undocumented}"


def test_dockerfile_is_portable_no_stage_chosen_by_an_argument() -> None:
    """buildah and podman resolve `FROM ${ARG}` only to images: a stage name from an ARG
    builds under BuildKit alone. Every variable base must be an image; COPY --from names stages."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.MULTILINE))
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    for base in re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE):
        for variable in re.findall(r"\$\{?(\w+)\}?", base):
            assert variable in defaults, f"FROM {base}: {variable} has no default"
            assert defaults[variable] not in stages and ":" in defaults[variable], f"FROM {base} picks a stage"
        if "$" not in base:
            assert base in stages or ":" in base, f"FROM {base}: neither a stage nor a tagged image"
    for source in re.findall(r"--from=(\S+)", dockerfile):
        assert source in stages, f"COPY --from={source} is not a stage"
    assert {"runtime", "flash-attn", "with-models", "flash-attn-with-models"} <= stages
    assert dockerfile.rstrip().endswith("FROM runtime")  # the default target
