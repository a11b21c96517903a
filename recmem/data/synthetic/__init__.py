"""recmem's synthetic Criteo-shaped click log, labelled by a hidden ground truth it also writes down.

``ids`` lays out each field's IDs (Zipf popularity, births and deaths in data time), ``dense`` the
count-like dense features, ``truth`` the ground-truth CTR model (first-order effects, pairwise latent
interactions, dense effects), ``oracle`` scores that truth, ``generator`` writes the Parquet (or hands
its training rows out as a stream of files: ``recmem generate --landing``).
"""

from recmem.data.synthetic.generator import generate, stream_tables
from recmem.data.synthetic.truth import GroundTruth, build_truth, scaled_cardinalities

__all__ = ["GroundTruth", "build_truth", "generate", "scaled_cardinalities", "stream_tables"]
