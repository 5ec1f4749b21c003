"""Dataset room: source adapters, the canonical `Case` schema, subsets and the dataset artifact (no torch)."""
