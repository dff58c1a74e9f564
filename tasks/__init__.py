"""Tasks: pure modules (preprocessing ops, metrics, splitting, reporting) and thin Prefect adapters."""
