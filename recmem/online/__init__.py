"""Online incremental training (``recmem online``): a stream of landed files scored then trained
window by window (``loop.py``), progress committed with the model (``source.py``), row deltas to the
model servers (``sync.py``), snapshots behind a guardrail (``snapshot.py``); on several Ray workers,
each window shared out (``distributed.py``) by a group of workers (``workers.py``). Producers land
their files through ``producer.py`` (``recmem generate --landing``)."""
