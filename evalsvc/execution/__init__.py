"""Execution: targets produce outputs (`targets`), the executor leases jobs, runs the target and
every grader, and records results in fenced batches (`executor`, `recorder`)."""
