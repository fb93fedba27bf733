"""Process exit codes of `virnucpro`: the contract with AWS Batch, Kubernetes and entrypoint.sh."""

OK = 0  # finished (also: the run was already finished)
INTERNAL_ERROR = 1  # a bug or an unexpected failure; the message says what
USAGE = 2  # bad command line (argparse), a number out of range included
SHARDS_FAILED = 3  # run completed but some shards failed repeatedly; see _FAILED, rerun with --retry-failed
BAD_INPUT = 65  # EX_DATAERR: a core.errors.UserError (input, models, settings a resume cannot take) or a read-only local disk
INTERRUPTED = 75  # EX_TEMPFAIL: a signal, a spot notice, a worker killed from outside, a full disk; safe to retry
