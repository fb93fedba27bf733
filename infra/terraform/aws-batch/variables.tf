variable "region" {
  description = "AWS region for every resource (e.g. us-east-1)."
  type        = string
}

variable "name" {
  description = "Name (and name prefix) of the queue, job definition, roles, repository and compute environments."
  type        = string
  default     = "virnucpro"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name: 2-31 characters, lower-case letters, digits and dashes, starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags for every resource (Project = name is always set)."
  type        = map(string)
  default     = {}
}

# ---- storage

variable "bucket_name" {
  description = "Globally unique name of the S3 bucket that holds inputs/, models/ and runs/."
  type        = string
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete a bucket that still holds objects and a repository that still holds images."
  type        = bool
  default     = false
}

variable "abort_incomplete_multipart_days" {
  description = "Days after which S3 discards the parts of multipart uploads that were never completed (e.g. by an interrupted job)."
  type        = number
  default     = 3
}

variable "models_uri" {
  description = "Where the job finds the three weights below. Null: s3://<bucket>/models. \"/opt/models\" for an image built with `--target with-models` (weights baked in)."
  type        = string
  default     = null
}

variable "esm_model" {
  description = "File name of the ESM-2 checkpoint under models_uri."
  type        = string
  default     = "esm2_t36_3B_UR50D.pt"
}

variable "dnabert_model" {
  description = "Name of the DNABERT-S model folder under models_uri."
  type        = string
  default     = "DNABERT-S"
}

variable "classifier" {
  description = "File name of the classifier under models_uri (500_model.pth, 300_model.pth or a converted .safetensors)."
  type        = string
  default     = "500_model.pth"
}

# ---- image

variable "image" {
  description = "Container image of the job. Null: an ECR repository named after `name` is created and <repository>:<image_tag> is used."
  type        = string
  default     = null
}

variable "image_tag" {
  description = "Tag of the image in the created ECR repository (used only when `image` is null). Prefer a version over `latest`: retried attempts pull again."
  type        = string
  default     = "latest"
}

# ---- compute

variable "vpc_id" {
  description = "VPC of the compute environments."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets for the GPU instances. They need a route to S3 and ECR: a NAT gateway, public IPs, or VPC endpoints. Several availability zones widen the spot pool."
  type        = list(string)
}

variable "spot_instance_types" {
  description = "GPU instance types of the spot compute environment. Each job takes one GPU, so single-GPU types waste least; more types and sizes make spot capacity easier to find."
  type        = list(string)
  default     = ["g5.xlarge", "g5.2xlarge", "g5.4xlarge", "g6.xlarge", "g6.2xlarge", "g6.4xlarge", "g6e.xlarge", "g6e.2xlarge"]
}

variable "on_demand_instance_types" {
  description = "GPU instance types of the on-demand compute environment that takes the jobs the spot one has no room for."
  type        = list(string)
  default     = ["g5.xlarge", "g6.xlarge", "g6e.xlarge"]
}

variable "spot_max_vcpus" {
  description = "vCPU ceiling of the spot compute environment (max_vcpus / job_vcpus jobs run at once)."
  type        = number
  default     = 64
}

variable "on_demand_max_vcpus" {
  description = "vCPU ceiling of the on-demand compute environment; 0 disables the on-demand overflow."
  type        = number
  default     = 16
}

variable "ecs_image_type" {
  description = "Batch-managed AMI family of the instances. ECS_AL2023_NVIDIA (Amazon Linux 2023, NVIDIA driver 580) is new enough for the image's CUDA 12.8 (driver >= 570); ECS_AL2_NVIDIA carries driver 550 (CUDA 12.4) and cannot run it (only an image built with --build-arg CUDA_VERSION=12.4.1 and cu124 torch)."
  type        = string
  default     = "ECS_AL2023_NVIDIA"
}

variable "root_volume_gib" {
  description = "Root volume of each instance (gp3), in GiB: holds the image and the model cache of every job running there (the ESM-2 3B checkpoint alone is several GB)."
  type        = number
  default     = 100
}

# ---- job

variable "job_vcpus" {
  description = "vCPUs reserved per job (one GPU each)."
  type        = number
  default     = 4
}

variable "job_memory_mib" {
  description = "Memory reserved per job, in MiB. Must fit the smallest instance type after the ECS agent's share (a 16 GiB g5.xlarge offers about 15 GiB)."
  type        = number
  default     = 14000
}

variable "shared_memory_mib" {
  description = "Size of /dev/shm in the job's container, in MiB (Docker's default of 64 MiB is too small for PyTorch worker processes)."
  type        = number
  default     = 2048
}

variable "retry_attempts" {
  description = "Attempts per job (or per array child), 1-10. Spot reclaims, start-up failures, interruptions (exit 75) and internal errors (exit 1) are retried, all counting against this; exits 2, 3 and 65 never are."
  type        = number
  default     = 5

  validation {
    condition     = var.retry_attempts >= 1 && var.retry_attempts <= 10
    error_message = "retry_attempts must be between 1 and 10 (an AWS Batch limit)."
  }
}

variable "attempt_duration_seconds" {
  description = "Time limit of one attempt, in seconds. Batch then stops the container (SIGTERM, SIGKILL 60 s later) and does not retry it; submitting the same command again resumes the run."
  type        = number
  default     = 43200

  validation {
    condition     = var.attempt_duration_seconds >= 60
    error_message = "attempt_duration_seconds must be at least 60 (an AWS Batch limit)."
  }
}
