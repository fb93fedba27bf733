"""Reads back what `terraform apply` created in moto and checks it is what the module means.

Usage (from .ci/terraform, AWS_ENDPOINT_URL pointing at moto):
    python3 .ci/terraform_readback.py OUTPUTS.json infra/README.md

Checks the job definition (retry rules evaluated the way AWS Batch does, against the job's
exit codes; timeout; GPU; role), the compute environments (spot allocation strategy, AMI
type, instance tags), the queue order, the launch template (IMDSv2, hop limit 2) and the job
role's S3 policy (writes under runs/ only, deletes only of a run's own _run/ state), then
submits the array job exactly as infra/README.md writes it. Prints every failed check and
exits 1 if there was one.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import sys
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from job import exit_codes  # noqa: E402

failures: list[str] = []


def check(condition: bool, what: str) -> None:
    print(("ok   " if condition else "FAIL ") + what)
    if not condition:
        failures.append(what)


def batch_action(rules: list[dict], exit_code: int | None, status_reason: str, reason: str) -> str:
    """What Batch does with a failed attempt: the first rule whose given patterns all match;
    no rule matching means a retry (AWS Batch's documented default)."""
    observed = {"onExitCode": None if exit_code is None else str(exit_code),
                "onStatusReason": status_reason, "onReason": reason}
    for rule in rules:
        patterns = {key: rule[key] for key in observed if key in rule}
        if all(observed[key] is not None and fnmatch.fnmatchcase(observed[key], pattern)
               for key, pattern in patterns.items()):
            return rule["action"].upper()
    return "RETRY"


def check_job_definition(batch, name_revision: str, role_arn: str) -> None:
    name, revision = name_revision.split(":")
    [definition] = [d for d in batch.describe_job_definitions(jobDefinitionName=name)["jobDefinitions"]
                    if d["revision"] == int(revision)]
    strategy = definition["retryStrategy"]
    rules = strategy["evaluateOnExit"]
    check(strategy["attempts"] == 5, f"retry attempts 5 (got {strategy['attempts']})")
    check(len(rules) <= 5, "at most 5 evaluateOnExit rules (a Batch limit)")
    finished = "Essential container in task exited"
    cases = [
        ("spot reclaim", None, "Host EC2 (instance i-0123456789abcdef0) terminated.", "", "RETRY"),
        ("image pull failure", None, "Task failed to start", "CannotPullContainerError: pull access denied", "RETRY"),
        ("container start failure", None, "Task failed to start", "CannotStartContainerError: oci runtime", "RETRY"),
        ("interrupted (75)", exit_codes.INTERRUPTED, finished, "", "RETRY"),
        ("internal error (1)", exit_codes.INTERNAL_ERROR, finished, "", "RETRY"),
        ("bad command line (2)", exit_codes.USAGE, finished, "", "EXIT"),
        ("shards failed (3)", exit_codes.SHARDS_FAILED, finished, "", "EXIT"),
        ("bad input (65)", exit_codes.BAD_INPUT, finished, "", "EXIT"),
        ("killed (137)", 137, finished, "OutOfMemoryError: Container killed due to memory usage", "EXIT"),
        ("attempt timeout", 137, "Job attempt duration exceeded timeout", "", "EXIT"),
    ]
    for what, code, status_reason, reason, expected in cases:
        got = batch_action(rules, code, status_reason, reason)
        check(got == expected, f"Batch: {what} -> {expected} (got {got})")
    check(definition.get("timeout", {}).get("attemptDurationSeconds") == 43200, "attempt timeout 43200 s")
    container = definition["containerProperties"]
    resources = {r["type"]: r["value"] for r in container["resourceRequirements"]}
    check(resources.get("GPU") == "1", "one GPU per job")
    check(container["jobRoleArn"] == role_arn, "the job role")
    environment = {e["name"] for e in container["environment"]}
    check({"ESM_MODEL_URI", "DNABERT_MODEL_URI", "CLASSIFIER_URI"} <= environment, "model variables set")
    check(container["image"].endswith(":0.1.0"), f"image tag from image_tag ({container['image']})")


def check_compute(batch, ec2, queue_name: str) -> None:
    [queue] = batch.describe_job_queues(jobQueues=[queue_name])["jobQueues"]
    order = [o["computeEnvironment"] for o in sorted(queue["computeEnvironmentOrder"], key=lambda o: o["order"])]
    environments = {e["computeEnvironmentArn"]: e for e in
                    batch.describe_compute_environments(computeEnvironments=order)["computeEnvironments"]}
    check(len(order) == 2 and set(order) == set(environments), "queue holds two compute environments")
    spot, on_demand = (environments[arn]["computeResources"] for arn in order)
    check(spot["type"] == "SPOT", f"first in the queue: spot (got {spot['type']})")
    check(spot.get("allocationStrategy") == "SPOT_PRICE_CAPACITY_OPTIMIZED", "spot: SPOT_PRICE_CAPACITY_OPTIMIZED")
    check(on_demand["type"] == "EC2", "second in the queue: on-demand")
    check(on_demand.get("allocationStrategy") == "BEST_FIT_PROGRESSIVE", "on-demand: BEST_FIT_PROGRESSIVE")
    for kind, resources in (("spot", spot), ("on-demand", on_demand)):
        images = [c.get("imageType") for c in resources.get("ec2Configuration", [])]
        check(images == ["ECS_AL2023_NVIDIA"], f"{kind}: AMI type ECS_AL2023_NVIDIA (got {images})")
        check(resources.get("minvCpus") == 0, f"{kind}: scales to 0 vCPUs")
        check(resources.get("tags", {}).get("Project") == "virnucpro", f"{kind}: instances tagged Project")
    template_id = spot["launchTemplate"]["launchTemplateId"]
    [version] = ec2.describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Latest"])[
        "LaunchTemplateVersions"]
    options = version["LaunchTemplateData"]["MetadataOptions"]
    check(options.get("HttpTokens") == "required", "launch template: IMDSv2 only")
    check(options.get("HttpPutResponseHopLimit") == 2, "launch template: hop limit 2")


def check_job_policy(iam, role_arn: str, bucket: str) -> None:
    role = role_arn.rsplit("/", 1)[1]
    document = iam.get_role_policy(RoleName=role, PolicyName="s3-run-bucket")["PolicyDocument"]
    if isinstance(document, str):
        document = json.loads(document)
    attached = iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]
    check(not attached, "job role: no managed policies attached")
    grants: dict[str, set[str]] = {}
    for statement in document["Statement"]:
        check(statement["Effect"] == "Allow", f"job role: only Allow statements ({statement.get('Sid')})")
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        for action in actions:
            check("*" not in action, f"job role: no wildcard action ({action})")
            grants.setdefault(action, set()).update(resources)
    objects = f"arn:aws:s3:::{bucket}/"
    check(grants.get("s3:PutObject") == {objects + "runs/*"}, f"PutObject only under runs/ ({grants.get('s3:PutObject')})")
    check(grants.get("s3:DeleteObject") == {objects + "runs/*/_run/*", objects + "runs/*/_FAILED"},
          f"DeleteObject only of a run's _run/ state and _FAILED ({grants.get('s3:DeleteObject')})")
    check(not {"s3:DeleteObjectVersion", "s3:PutBucketPolicy", "s3:DeleteBucket"} & grants.keys(),
          "job role: no version deletes or bucket changes")


def readme_submission(readme: Path, variables: dict[str, str]) -> dict:
    """The `aws batch submit-job` command of infra/README.md as boto3 arguments."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.DOTALL)
                 if "aws batch submit-job" in b)
    command = block.replace("\\\n", " ")
    for name, value in variables.items():
        command = command.replace(f"${name}", value).replace(f"${{{name}}}", value)
    words = shlex.split(command)
    assert words[:3] == ["aws", "batch", "submit-job"], words[:3]
    flags = dict(zip(words[3::2], words[4::2]))
    arguments = {"jobName": flags.pop("--job-name"), "jobQueue": flags.pop("--job-queue"),
                 "jobDefinition": flags.pop("--job-definition"),
                 "containerOverrides": json.loads(flags.pop("--container-overrides"))}
    if "--array-properties" in flags:
        key, _, size = flags.pop("--array-properties").partition("=")
        assert key == "size", key
        arguments["arrayProperties"] = {"size": int(size)}
    assert not flags, f"flags not understood here: {flags}"
    return arguments


def main() -> int:
    outputs = {name: value["value"] for name, value in json.loads(Path(sys.argv[1]).read_text()).items()}
    batch, ec2, iam = (boto3.client(name) for name in ("batch", "ec2", "iam"))
    check_job_definition(batch, outputs["job_definition"], outputs["job_role_arn"])
    check_compute(batch, ec2, outputs["job_queue"])
    check_job_policy(iam, outputs["job_role_arn"], outputs["bucket"])

    arguments = readme_submission(Path(sys.argv[2]), {"QUEUE": outputs["job_queue"], "JOBDEF": outputs["job_definition"],
                                                      "BUCKET": outputs["bucket"]})
    job_id = batch.submit_job(**arguments)["jobId"]
    [job] = batch.describe_jobs(jobs=[job_id])["jobs"]
    environment = {e["name"]: e["value"] for e in job["container"]["environment"]}
    check(job["jobQueue"].endswith(outputs["job_queue"]), "README job: submitted to the module's queue")
    check(job.get("arrayProperties", {}).get("size", 0) >= 2, "README job: an array job")
    check(environment.get("OUTPUT_URI", "").startswith(f"s3://{outputs['bucket']}/runs/"),
          "README job: OUTPUT_URI under runs/ (the only prefix the job role may write)")
    check(all(uri.startswith(f"s3://{outputs['bucket']}/inputs/") for uri in environment.get("INPUT_URI", "-").split()),
          "README job: INPUT_URI under inputs/")
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    sys.exit(main())
