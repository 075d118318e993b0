"""Run events: the in-memory fan-out to watchers (`bus`) and the resumable watch (`watch`)."""
