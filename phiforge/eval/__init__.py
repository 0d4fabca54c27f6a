"""Evaluation: LM tasks, code sandbox, metrics."""
