"""The image stage: renderers behind one registry (`images.backend`: diffusers, procedural), each a Ray Data UDF."""
