"""evalsvc: a gRPC service that runs LLM evaluations durably and streams their progress."""

__version__ = "0.1.0"


def package_version() -> str:
    """The installed package's version (importlib.metadata: `evalsvc --version`, the start's log line), else the
    source tree's `__version__`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evalsvc")
    except PackageNotFoundError:
        return __version__
