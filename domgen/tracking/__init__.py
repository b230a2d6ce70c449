"""Tracking: MLflow (an embedded SQLite store by default) and reports rebuilt from it."""
