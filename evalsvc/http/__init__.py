"""Outbound HTTP shared by targets, judges, dataset generation and webhooks (`outbound`): the SSRF
rule, each endpoint's adaptive concurrency slots, retries, and the one HTTP client. A leaf: it knows
endpoints and URLs, not runs."""
