"""Generated from protos/evalsvc/v1 by scripts/gen_protos.py. Do not edit."""
