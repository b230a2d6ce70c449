"""Methods that act on trained models: Certainty-Index pseudo-labels, transfer strategies."""
