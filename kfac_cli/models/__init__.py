"""Model checkpoints to layer tables: ``.pt2`` archives, state dicts (with a layer spec)
and, only when trusted, pickled modules."""
