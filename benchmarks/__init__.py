"""Benchmarks of prompt-tasks: ``python -m benchmarks.<name>`` against private servers."""
