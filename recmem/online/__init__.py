"""Online incremental training (``recmem online``): a stream of landed files scored then trained
window by window (``loop.py``), progress committed with the model (``source.py``), row deltas to the
model servers (``sync.py``)."""
