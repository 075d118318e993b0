"""Generated from protos/ by `make generate-clients`. Do not edit."""
