"""The project's own gRPC surface (later issue)."""
