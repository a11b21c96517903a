"""recmem: a Ray-distributed CTR trainer with full, hashed and collisionless (expirable) embedding tables."""

__version__ = "0.1.0"
