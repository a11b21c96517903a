"""Ray-distributed training: the same loop (``recmem/train/loop.py``) on Ray workers.

- ``launcher.py``: the driver (``train_ray``, ``evaluate_ray``): Ray, MLflow run, the worker group; no
  torch import.
- ``group.py``: the worker group: plain Ray actors in one ``torch.distributed`` group, restarted on failure.
- ``data.py``: the driver's plan of the splits' row groups -> each worker's ``BatchSource`` of its own rows.
- ``worker.py``: each worker's entry: its model part, then ``train()``.
- ``plan.py``: how tables are split over workers (the sharding plan).
- ``dmp.py``: TorchRec ``DistributedModelParallel`` for ``full``/``hash`` tables.
- ``store.py``: per-rank checkpoint shards in the run's folder under ``ray.storage_path``.
"""

from recmem.train.distributed.launcher import RayTrainResult, evaluate_ray, train_ray

__all__ = ["RayTrainResult", "evaluate_ray", "train_ray"]
