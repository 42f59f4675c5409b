"""Sweeps: search spaces checked against the run config, data pools with nested subsets, scaling-law fits, reports."""
