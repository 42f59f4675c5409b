"""Training: losses, on-device augmentation, batches, the DeepSpeed worker loop and the Ray Train driver."""
