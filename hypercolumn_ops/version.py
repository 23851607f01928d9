"""The package's version: the one place it is written. The build reads it (pyproject.toml,
``[tool.setuptools.dynamic]``, without importing the package) and ``hypercolumn_ops.__version__``
re-exports it."""

__version__ = "0.1.0"
