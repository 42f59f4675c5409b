"""The run programs (run, train, generate, rewrite, eval, sweep): each executes a plan inside the one Ray session."""
