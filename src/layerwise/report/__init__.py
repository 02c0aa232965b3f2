"""Rendering only: the report reads a Profile and never runs the model."""

from .profile import render, write_report

__all__ = ["render", "write_report"]
