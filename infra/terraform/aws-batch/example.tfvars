# Example values: copy to terraform.tfvars (git-ignored) and put in your own.
# .ci/lint plans against this file offline, so keep it complete and valid.
region      = "us-east-1"
bucket_name = "my-org-virnucpro-runs"
vpc_id      = "vpc-0123456789abcdef0"
subnet_ids  = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]

# Optional (defaults shown in variables.tf):
# image               = "123456789012.dkr.ecr.us-east-1.amazonaws.com/virnucpro:0.1.0"
# image_tag           = "0.1.0"
# spot_max_vcpus      = 128
# on_demand_max_vcpus = 0
# classifier          = "300_model.pth"
