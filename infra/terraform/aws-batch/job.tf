# The image repository (unless var.image names an image elsewhere) and the job definition.

resource "aws_ecr_repository" "job" {
  count = var.image == null ? 1 : 0

  name                 = var.name
  image_tag_mutability = "MUTABLE"
  force_delete         = var.force_destroy

  image_scanning_configuration {
    scan_on_push = true
  }
}

locals {
  image      = var.image != null ? var.image : "${aws_ecr_repository.job[0].repository_url}:${var.image_tag}"
  models_uri = trimsuffix(coalesce(var.models_uri, "s3://${aws_s3_bucket.runs.bucket}/models"), "/")

  # Defaults for entrypoint.sh; a submission adds INPUT_URI and OUTPUT_URI and may override
  # any of these (containerOverrides.environment).
  job_environment = {
    AWS_DEFAULT_REGION = var.region
    ESM_MODEL_URI      = "${local.models_uri}/${var.esm_model}"
    DNABERT_MODEL_URI  = "${local.models_uri}/${var.dnabert_model}"
    CLASSIFIER_URI     = "${local.models_uri}/${var.classifier}"
  }
}

resource "aws_batch_job_definition" "job" {
  name                  = var.name
  type                  = "container"
  platform_capabilities = ["EC2"]
  propagate_tags        = true

  # No command: the image's entrypoint builds the `virnucpro run` command line from the
  # environment; a submission's containerOverrides.command adds flags to it.
  # An array job needs nothing more: each child reads AWS_BATCH_JOB_ARRAY_INDEX/_SIZE itself.
  container_properties = jsonencode({
    image      = local.image
    jobRoleArn = aws_iam_role.job.arn
    resourceRequirements = [
      { type = "GPU", value = "1" },
      { type = "VCPU", value = tostring(var.job_vcpus) },
      { type = "MEMORY", value = tostring(var.job_memory_mib) },
    ]
    environment     = [for name, value in local.job_environment : { name = name, value = value }]
    linuxParameters = { sharedMemorySize = var.shared_memory_mib }
  })

  # First match wins (at most 5 rules; an attempt that matches none would be retried, hence
  # the catch-all). Retried, each attempt resuming the same shards from the run's checkpoints:
  # a reclaimed spot or failed host ("Host EC2 (instance i-...) terminated."), a container
  # that never started ("Task failed to start": CannotPullContainerError and the like), an
  # interrupted job (exit 75: flushed, safe to rerun) and an internal error (exit 1: may be
  # transient). Never retried: exit 2 (command line), 3 (shards failed --max-attempts times),
  # 65 (bad input), or anything else, e.g. a kill at the attempt timeout.
  retry_strategy {
    attempts = var.retry_attempts

    evaluate_on_exit {
      on_status_reason = "Host EC2*"
      action           = "RETRY"
    }

    evaluate_on_exit {
      on_status_reason = "Task failed to start*"
      action           = "RETRY"
    }

    evaluate_on_exit {
      on_exit_code = "75"
      action       = "RETRY"
    }

    evaluate_on_exit {
      on_exit_code = "1"
      action       = "RETRY"
    }

    evaluate_on_exit {
      on_reason = "*"
      action    = "EXIT"
    }
  }

  timeout {
    attempt_duration_seconds = var.attempt_duration_seconds
  }
}
