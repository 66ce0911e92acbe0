"""Generated from protos/twopc_pb by scripts/gen_protos.py. Do not edit."""
