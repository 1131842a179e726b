"""gRPC transport: interceptors that enforce the proto's policy, and the servicer."""
