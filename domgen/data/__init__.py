"""Data: the case model, readers for the real on-disk formats, the dataset registry and the synthetic suite."""
