"""Type aliases shared across the package (one definition each)."""

from __future__ import annotations

__all__ = ["Scalar"]

Scalar = str | int | float | bool
"""A plain value: a metric, a task setting, a configuration value (what CBOR and TOML carry as is)."""
