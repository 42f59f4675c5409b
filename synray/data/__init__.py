"""Rows and their storage, a leaf below every stage: schema and ids, image and mask codecs, stage counters, the Parquet store."""
