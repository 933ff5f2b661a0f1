"""Triton's example programs, kept verbatim as test data: pytest must not collect them
(memory_growth_test.py matches its default pattern)."""
collect_ignore_glob = ["*.py"]
