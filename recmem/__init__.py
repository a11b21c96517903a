"""recmem: a Ray-distributed CTR trainer with collisionless, memory-efficient and SSD-offloaded tables."""

__version__ = "0.1.0"
