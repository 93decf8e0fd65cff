"""Code shared by the web tier, the workers and training (no TensorFlow at import)."""
