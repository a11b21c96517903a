"""Ray-distributed training: the same loop (``recmem/train/loop.py``) on Ray Train workers.

- ``launcher.py``: the driver (``train_ray``, ``evaluate_ray``): Ray, MLflow run, ``TorchTrainer``; no
  torch import.
- ``data.py``: the driver's plan of the splits' row groups -> each worker's ``BatchSource`` of its own rows.
- ``worker.py``: each worker's entry: its model part, then ``train()``.
- ``plan.py``: how tables are split over workers (the sharding plan).
- ``dmp.py``: TorchRec ``DistributedModelParallel`` for ``full``/``hash`` tables.
- ``store.py``: per-rank checkpoint shards through Ray Train's checkpoint storage.
"""

from recmem.train.distributed.launcher import RayTrainResult, evaluate_ray, train_ray

__all__ = ["RayTrainResult", "evaluate_ray", "train_ray"]
