"""One serving instance without Ray."""
