"""Generation: the streaming pipeline builder (captions -> images -> store) and regeneration of rows from provenance."""
