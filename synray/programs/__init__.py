"""The run programs (run, train, generate, rewrite, eval): each executes a plan inside the one Ray session."""
