"""Runs: validation of new runs, the run service (create, read, list, cancel, results), conversions."""
