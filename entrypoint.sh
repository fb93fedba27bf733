#!/usr/bin/env bash
# Container entrypoint: turns the job's environment into `virnucpro run` flags and execs it,
# so that the job itself receives SIGTERM and its exit code (0, 3, 65, 75, ...) is the
# container's.
#
#   INPUT_URI          required; several URIs separated by whitespace
#   OUTPUT_URI         required
#   ESM_MODEL_URI      required
#   DNABERT_MODEL_URI  required
#   CLASSIFIER_URI     required
#   CHUNK_LENGTH       optional (default: taken from the classifier)
#   EXTRA_ARGS         optional; more flags, separated by whitespace (no quoting)
#   "$@"               appended last, so they override all of the above
#
# Never `set -x` here and never print the environment: it carries AWS credentials.
set -euo pipefail

readonly EX_DATAERR=65  # job/exit_codes.py BAD_INPUT: retrying the same command cannot help

die() {
  printf 'entrypoint: %s\n' "$*" >&2
  exit "$EX_DATAERR"
}

require() {
  [[ -n "${!1:-}" ]] || die "$1 is not set ($2)"
}

# One argument as it may appear in the log: URL credentials (scheme://user:pass@host, up to
# the last @ since passwords are not always escaped) and query strings (pre-signed URLs carry
# signatures there) are replaced by ***.
redact() {
  local arg=$1
  if [[ $arg =~ ^([A-Za-z][A-Za-z0-9+.-]*://).*@(.*)$ ]]; then
    arg="${BASH_REMATCH[1]}***@${BASH_REMATCH[2]}"
  fi
  if [[ $arg == *'?'* ]]; then
    arg="${arg%%\?*}?***"
  fi
  printf '%s' "$arg"
}

# The command line for the log, with the value of any flag named like a secret (a
# dash-separated word key, secret, token, password or credentials: --aws-secret-access-key,
# --session-token) hidden as well.
loggable() {
  local arg flag secret_next=0 out=()
  local -r secret_flag='^--([a-z0-9]+-)*(key|secret|token|password|credentials?)(-[a-z0-9]+)*$'
  for arg in "$@"; do
    flag=${arg%%=*}
    flag=${flag,,}
    if ((secret_next)); then
      out+=('***')
      secret_next=0
    elif [[ $flag =~ $secret_flag && $arg == *=* ]]; then
      out+=("${arg%%=*}=***")
    elif [[ $flag =~ $secret_flag ]]; then
      out+=("$arg")
      secret_next=1
    else
      out+=("$(redact "$arg")")
    fi
  done
  printf '%s' "${out[*]}"
}

require INPUT_URI "the input FASTA/FASTQ URI(s), separated by spaces"
require OUTPUT_URI "the output URI (e.g. s3://bucket/runs/<run-id>/)"
require ESM_MODEL_URI "the ESM-2 checkpoint URI"
require DNABERT_MODEL_URI "the DNABERT-S model URI"
require CLASSIFIER_URI "the classifier weights URI (300_model.pth or 500_model.pth)"

# Whitespace-separated lists are split by `read` (no globbing; newlines count as spaces).
read -r -d '' -a inputs <<<"$INPUT_URI" || true
((${#inputs[@]})) || die "INPUT_URI holds no URI"

args=(
  run
  --input "${inputs[@]}"
  --output "$OUTPUT_URI"
  --esm-model "$ESM_MODEL_URI"
  --dnabert-model "$DNABERT_MODEL_URI"
  --classifier "$CLASSIFIER_URI"
)
if [[ -n "${CHUNK_LENGTH:-}" ]]; then
  args+=(--chunk-length "$CHUNK_LENGTH")
fi
read -r -d '' -a extra <<<"${EXTRA_ARGS:-}" || true
args+=("${extra[@]}" "$@")

printf 'entrypoint: virnucpro %s\n' "$(loggable "${args[@]}")" >&2
exec virnucpro "${args[@]}"
