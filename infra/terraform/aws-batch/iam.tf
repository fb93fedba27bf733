data "aws_partition" "current" {}

locals {
  # Who may assume each role.
  role_principals = {
    ecs-instance  = "ec2.amazonaws.com"       # the GPU instances (ECS agent, image pulls)
    batch-service = "batch.amazonaws.com"     # AWS Batch managing the compute environments
    job           = "ecs-tasks.amazonaws.com" # the job's container
  }

  read_prefixes  = ["inputs/", "models/"]
  write_prefixes = ["runs/"]
}

data "aws_iam_policy_document" "assume" {
  for_each = local.role_principals

  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = [each.value]
    }
  }
}

# ---- instances: the standard ECS container-instance policy (ECS agent, ECR pulls, logs).

resource "aws_iam_role" "ecs_instance" {
  name               = "${var.name}-ecs-instance"
  assume_role_policy = data.aws_iam_policy_document.assume["ecs-instance"].json
}

resource "aws_iam_role_policy_attachment" "ecs_instance" {
  role       = aws_iam_role.ecs_instance.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"
}

resource "aws_iam_instance_profile" "ecs_instance" {
  name = "${var.name}-ecs-instance"
  role = aws_iam_role.ecs_instance.name
}

# ---- AWS Batch itself.

resource "aws_iam_role" "batch_service" {
  name               = "${var.name}-batch-service"
  assume_role_policy = data.aws_iam_policy_document.assume["batch-service"].json
}

resource "aws_iam_role_policy_attachment" "batch_service" {
  role       = aws_iam_role.batch_service.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AWSBatchServiceRole"
}

# ---- the job: S3 access limited to the bucket's three prefixes, nothing else.

data "aws_iam_policy_document" "job" {
  statement {
    sid       = "ListOwnPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.runs.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [for p in concat(local.read_prefixes, local.write_prefixes) : "${p}*"]
    }
  }

  statement {
    sid       = "BucketRegion"
    actions   = ["s3:GetBucketLocation"]
    resources = [aws_s3_bucket.runs.arn]
  }

  statement {
    sid       = "ReadInputsModelsRuns"
    actions   = ["s3:GetObject"]
    resources = [for p in concat(local.read_prefixes, local.write_prefixes) : "${aws_s3_bucket.runs.arn}/${p}*"]
  }

  # PutObject also covers the create/upload-part/complete steps of a multipart upload.
  statement {
    sid = "WriteRuns"
    actions = [
      "s3:PutObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [for p in local.write_prefixes : "${aws_s3_bucket.runs.arn}/${p}*"]
  }

  # The job deletes only its own state (committed parts after the merge, write probes), all
  # under <run>/_run/, and a run's _FAILED marker when --retry-failed runs its failed shards
  # again: the outputs of a run (prediction_results.txt, reads.tsv, _SUCCESS, ...) cannot be
  # deleted by any job. One role serves every run, so a job could still overwrite
  # another run's files: infra/README.md ("Least privilege") says how to narrow that.
  statement {
    sid     = "DeleteRunState"
    actions = ["s3:DeleteObject"]
    resources = flatten([
      for p in local.write_prefixes : ["${aws_s3_bucket.runs.arn}/${p}*/_run/*", "${aws_s3_bucket.runs.arn}/${p}*/_FAILED"]
    ])
  }
}

resource "aws_iam_role" "job" {
  name               = "${var.name}-job"
  assume_role_policy = data.aws_iam_policy_document.assume["job"].json
}

resource "aws_iam_role_policy" "job_s3" {
  name   = "s3-run-bucket"
  role   = aws_iam_role.job.id
  policy = data.aws_iam_policy_document.job.json
}
