output "bucket" {
  description = "The run bucket: upload reads to inputs/, weights to models/; runs write under runs/."
  value       = aws_s3_bucket.runs.bucket
}

output "ecr_repository_url" {
  description = "Where to push the image (null when var.image names one elsewhere)."
  value       = one(aws_ecr_repository.job[*].repository_url)
}

output "image" {
  description = "The image the job definition runs."
  value       = local.image
}

output "job_queue" {
  description = "Job queue to submit to (spot first, then on-demand)."
  value       = aws_batch_job_queue.gpu.name
}

output "job_definition" {
  description = "Job definition to submit (name:revision)."
  value       = "${aws_batch_job_definition.job.name}:${aws_batch_job_definition.job.revision}"
}

output "job_role_arn" {
  description = "IAM role the job's container runs as."
  value       = aws_iam_role.job.arn
}

output "job_s3_policy_json" {
  description = "The job's S3 policy, for reuse elsewhere (e.g. the IRSA role of the Kubernetes service account)."
  value       = data.aws_iam_policy_document.job.json
}
