"""evalsvc: a gRPC service that runs LLM evaluations durably and streams their progress."""

__version__ = "0.1.0"
