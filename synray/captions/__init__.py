"""Caption synthesis as Ray Data stages: row planning, the vLLM engine pool, template captions, clean-up and LaCLIP rewriting."""
