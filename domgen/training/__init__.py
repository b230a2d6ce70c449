"""Training: augmentation, losses, the training loop and prediction."""
