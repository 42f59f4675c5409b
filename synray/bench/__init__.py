"""`synray bench`: throughput and memory ratios measured side by side (a layer above the programs it drives)."""
