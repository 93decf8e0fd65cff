"""Developer tools: run the stack locally."""
