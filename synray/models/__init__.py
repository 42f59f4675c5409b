"""Model factories: tiny offline models, vision backbones and projection heads."""
