"""Where a run's files live and how they are written: locations (local or object store), the run folder's layout,
atomic writes and stage markers, manifests. Imports nothing of the engine but its config."""
