"""Plain torch modules and checkpoint formats."""
