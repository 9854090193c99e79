"""The four services. Each is its own process; they talk to each other only over gRPC."""
