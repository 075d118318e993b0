"""API keys: their format, storage and verification, and the tenant each one belongs to."""
