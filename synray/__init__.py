"""synray: visual representation learning on synthetic data with Ray Data, Ray Train + DeepSpeed and Ray Tune."""
