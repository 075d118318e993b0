"""Alembic migrations of the evalsvc schema (see `evalsvc.store.migrate` for how they are run)."""
