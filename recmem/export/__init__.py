"""Export: a trained model (checkpoint, MLflow run, Ray run) -> a serving bundle (``recmem/serving``).

- ``job.py``: ``recmem export``'s entry points: find the checkpoint, load it, write the bundle.
- ``writer.py``: the bundle's files and manifest, the dense part through ``torch.export``.
- ``distributed.py``: a Ray run's shards gathered by one export worker per rank.
"""
