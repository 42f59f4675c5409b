"""Caption synthesis: SynCLR and LaCLIP prompts, template styles, the vLLM stage and caption clean-up."""
