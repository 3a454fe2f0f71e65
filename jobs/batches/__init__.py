"""Batches (the OpenAI Batch API), one module per step of a batch's life: `lines` checks input
lines and `output_format` writes output and error lines; `store` keeps the batch rows; `steps`
is the lease the long steps are taken under; `validation` turns lines into jobs; `finalizing`
writes the output and error files, and `progress_output` the lines finished so far, while the
batch runs; `estimating` is the dry run and `retry` the retry of failed lines. The passes that
move batches forward are in `jobs.maintenance.batches`. This module is the package's API: the
names its callers use.
"""

from jobs.batches.estimating import estimate
from jobs.batches.finalizing import finalize, finalize_if_done
from jobs.batches.lines import InvalidLine, LineChecker, ValidLine, check_file, owner_adapters
from jobs.batches.progress_output import (
    MAX_LINE,
    RESUME_HEADER,
    FinishedLines,
    finished_lines,
)
from jobs.batches.retry import retry_failed
from jobs.batches.store import (
    cancel_batch,
    create_batch,
    get_batch,
    input_file,
    line_job_id,
    list_batches,
)
from jobs.batches.validation import validate_batch

__all__ = [
    "MAX_LINE",
    "RESUME_HEADER",
    "FinishedLines",
    "InvalidLine",
    "LineChecker",
    "ValidLine",
    "cancel_batch",
    "check_file",
    "create_batch",
    "estimate",
    "finalize",
    "finalize_if_done",
    "finished_lines",
    "get_batch",
    "input_file",
    "line_job_id",
    "list_batches",
    "owner_adapters",
    "retry_failed",
    "validate_batch",
]
