"""Secrets that targets and judges name (`api_key_secret`, `secret:NAME` headers): the operator's, each
granted to some tenants, and each tenant's own, encrypted at rest. docs/security.md has the rules."""
