"""Checkpoint conversion: one declarative weight table, invertible transforms, streaming converters, CLI."""
