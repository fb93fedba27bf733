# The run bucket. Layout (the job role's permissions follow it):
#   inputs/  reads to classify            (job: read)
#   models/  ESM-2, DNABERT-S, classifier (job: read)
#   runs/    one prefix per run: shards, leases, checkpoints, parts, merged outputs (job: read-write)
# Versioning stays off: the job rewrites its leases and checkpoints often, and old versions
# would pile up.

resource "aws_s3_bucket" "runs" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_public_access_block" "runs" {
  bucket = aws_s3_bucket.runs.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# SSE-S3 keeps the job role free of KMS permissions; switching to SSE-KMS needs
# kms:Decrypt and kms:GenerateDataKey on the key added to the job policy (iam.tf).
resource "aws_s3_bucket_server_side_encryption_configuration" "runs" {
  bucket = aws_s3_bucket.runs.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# An interrupted job can leave multipart uploads open: their parts are billed until aborted.
resource "aws_s3_bucket_lifecycle_configuration" "runs" {
  bucket = aws_s3_bucket.runs.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.runs.arn, "${aws_s3_bucket.runs.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "runs" {
  bucket = aws_s3_bucket.runs.id
  policy = data.aws_iam_policy_document.bucket.json

  # S3 rejects some policies while the public access block is being changed.
  depends_on = [aws_s3_bucket_public_access_block.runs]
}
