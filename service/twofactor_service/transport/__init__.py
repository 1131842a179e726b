"""gRPC transport: the call pipeline that enforces the proto's policy, and the servicer."""
