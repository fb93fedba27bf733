# GPU instances for the job: a spot compute environment first, an on-demand one for the jobs
# it has no room for, both behind one queue. Instances scale to zero when the queue is empty.

resource "aws_security_group" "batch" {
  name_prefix = "${var.name}-batch-"
  description = "VirNucPro Batch instances: no inbound, all outbound (S3, ECR, ECS)"
  vpc_id      = var.vpc_id

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_egress_rule" "batch_all" {
  security_group_id = aws_security_group.batch.id
  description       = "All outbound traffic"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_launch_template" "gpu" {
  name_prefix            = "${var.name}-gpu-"
  update_default_version = true

  # IMDSv2 only. Hop limit 2: the job runs in a container one network hop further than the
  # host and reads the spot interruption notice from the instance metadata service.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 2
  }

  # When Batch stops a job (terminate-job, attempt timeout) the ECS agent sends SIGTERM and
  # SIGKILLs after ECS_CONTAINER_STOP_TIMEOUT (default 30 s). The job needs --grace-seconds
  # (25) plus 5 s to stop its workers, so give it 60. Batch requires MIME multi-part here.
  user_data = base64encode(<<-EOT
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="==BOUNDARY=="

    --==BOUNDARY==
    Content-Type: text/x-shellscript; charset="us-ascii"

    #!/bin/bash
    echo "ECS_CONTAINER_STOP_TIMEOUT=60s" >> /etc/ecs/ecs.config

    --==BOUNDARY==--
  EOT
  )

  block_device_mappings {
    device_name = "/dev/xvda"

    ebs {
      volume_size           = var.root_volume_gib
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }
}

locals {
  compute_environments = {
    spot = {
      type                = "SPOT"
      allocation_strategy = "SPOT_PRICE_CAPACITY_OPTIMIZED"
      instance_types      = var.spot_instance_types
      max_vcpus           = var.spot_max_vcpus
    }
    on-demand = {
      type                = "EC2"
      allocation_strategy = "BEST_FIT_PROGRESSIVE"
      instance_types      = var.on_demand_instance_types
      max_vcpus           = var.on_demand_max_vcpus
    }
  }
}

resource "aws_batch_compute_environment" "gpu" {
  for_each = local.compute_environments

  compute_environment_name_prefix = "${var.name}-${each.key}-"
  type                            = "MANAGED"
  service_role                    = aws_iam_role.batch_service.arn

  compute_resources {
    type                = each.value.type
    allocation_strategy = each.value.allocation_strategy
    instance_type       = each.value.instance_types
    min_vcpus           = 0
    max_vcpus           = each.value.max_vcpus
    instance_role       = aws_iam_instance_profile.ecs_instance.arn
    subnets             = var.subnet_ids
    security_group_ids  = [aws_security_group.batch.id]

    launch_template {
      launch_template_id = aws_launch_template.gpu.id
      version            = aws_launch_template.gpu.latest_version
    }

    ec2_configuration {
      image_type = var.ecs_image_type
    }

    # Applied to the instances (the provider's default_tags do not reach them).
    tags = merge({ Project = var.name, Name = "${var.name}-${each.key}" }, var.tags)
  }

  # A replaced environment must exist before the queue lets go of the old one.
  lifecycle {
    create_before_destroy = true
  }

  # Batch needs its role's permissions while it tears an environment down.
  depends_on = [aws_iam_role_policy_attachment.batch_service]
}

# Jobs go to the spot environment while it is below its max_vcpus, and overflow to on-demand
# when it is full. (Batch does not move jobs when spot capacity is merely unavailable: they
# wait, RUNNABLE, for the spot environment to get instances.)
resource "aws_batch_job_queue" "gpu" {
  name     = var.name
  state    = "ENABLED"
  priority = 1

  compute_environment_order {
    order               = 1
    compute_environment = aws_batch_compute_environment.gpu["spot"].arn
  }

  compute_environment_order {
    order               = 2
    compute_environment = aws_batch_compute_environment.gpu["on-demand"].arn
  }
}
