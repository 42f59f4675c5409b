"""Evaluation of frozen backbones: feature extraction through Ray Data; kNN, linear, zero-shot and segmentation probes."""
