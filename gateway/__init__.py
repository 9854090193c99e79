"""The REST gateway: Envoy's gRPC-JSON transcoder in front of the four services."""
