"""Execution: the executor leases jobs, has the target (evalsvc.targets) answer and every grader score,
and records results in fenced batches (`executor`, `recorder`), with the run's aggregate at the end
(`aggregate`) and the response cache in front of targets and judges (`cache`)."""
