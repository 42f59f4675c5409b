"""What captions say, as pure functions of (plan, seed): SynCLR/LaCLIP prompts and their example pools, the
model-free template styles, the procedural shapes language, and the tiny caption model's training corpus."""
