"""Moving KV blocks between processes and nodes behind one protocol."""
