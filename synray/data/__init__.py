"""Rows and their storage: schema, the generation pipeline, the Parquet store, regeneration from provenance."""
