"""Checkpoint conversion: one declarative weight table, invertible transforms, streaming converters, CLI."""

from .table import TABLE, Entry, Kind, Layout, Plan, Rule, Scope, Tensor, build_plan, mp_entries, mp_file_name

__all__ = [
    "TABLE",
    "Entry",
    "Kind",
    "Layout",
    "Plan",
    "Rule",
    "Scope",
    "Tensor",
    "build_plan",
    "mp_entries",
    "mp_file_name",
]
