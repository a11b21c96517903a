"""Serving: load an exported bundle and score raw rows with torch alone (no torchrec, fbgemm, numba,
Ray, MLflow or recmem's training code). ``bundle.py`` is the front door; ``lookup.py`` holds the
tables' serving forms, ``inputs.py`` the raw-row conversion."""

from recmem.serving.bundle import Bundle, BundleError, DeltaConflict, load_bundle
from recmem.serving.inputs import InputError

__all__ = ["Bundle", "BundleError", "DeltaConflict", "InputError", "load_bundle"]
