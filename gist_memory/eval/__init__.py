"""Evaluation: retention QA, metrics, the benchmark harness and its baselines."""
