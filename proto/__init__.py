"""The project's own gRPC surface: the model hub (``hub.proto`` and its generated code)."""
