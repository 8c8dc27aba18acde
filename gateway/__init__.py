"""OpenAI-compatible REST gateway in front of the gRPC embedding service."""
