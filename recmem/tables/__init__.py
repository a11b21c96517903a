"""recmem."""
