"""The tunnel benchmarks (see README.md beside this file).

Each bench is a module run from the repository root: ``python -m bench.<name>``.
"""
