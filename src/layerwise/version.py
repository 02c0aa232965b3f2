"""The package's version, in a module of its own so that any module (and pyproject.toml) reads it without importing
the package's ``__init__`` and everything it imports."""

__version__ = "0.1.0"
