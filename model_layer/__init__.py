"""Shared model layer: loading (hub id / local path / embedded GGUF), architecture descriptors, attention capture."""
