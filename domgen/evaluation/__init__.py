"""Evaluation: overlap and surface metrics, the cut-off choice."""
