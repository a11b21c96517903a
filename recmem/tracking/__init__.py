"""MLflow tracking: the one place rank 0 writes params, metrics and artifacts."""
