"""Generated gRPC stubs for the lineinspect.v1 API (protos/generate.py). DO NOT EDIT."""
