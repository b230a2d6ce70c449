"""Preprocessing: intensity (HU, windows, normalisations, resizing), lung masks and patient-wise splits."""
