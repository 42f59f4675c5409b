"""Models: vision backbones, heads, the image-text model, input preprocessing, and the tiny offline models (LLM, SD, text tower)."""
