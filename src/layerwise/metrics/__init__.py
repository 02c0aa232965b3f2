"""Metric families: small pure functions over streamed statistics."""
