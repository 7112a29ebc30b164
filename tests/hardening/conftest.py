"""The fuzz tests' settings and fixtures live in ``fuzzing.py`` (importable by the test modules)."""

from fuzzing import bounded_memory  # noqa: F401  (a fixture)
