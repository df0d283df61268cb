"""Training the embedded default model."""
