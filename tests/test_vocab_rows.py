"""The `full` table's ID -> row lookup agrees with a plain sorted-array search, OOV IDs included."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recmem.tables.full import vocab_rows

ids = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=60, deadline=None)
@given(
    vocabs=st.lists(st.lists(ids, max_size=80, unique=True), min_size=1, max_size=4),
    picks=st.lists(st.tuples(st.integers(0, 10**6), st.booleans()), max_size=200),
    seed=st.integers(0, 2**16),
)
def test_rows_match_a_sorted_search(vocabs, picks, seed):
    rng = np.random.default_rng(seed)
    sorted_vocabs = [np.sort(np.array(v, dtype=np.int64)) for v in vocabs]
    features = [[] for _ in vocabs]
    for k, (pick, known) in enumerate(picks):
        f = k % len(vocabs)
        vocab = sorted_vocabs[f]
        # Half the IDs from the vocabulary, the rest anywhere (mostly out of it).
        features[f].append(int(vocab[pick % len(vocab)]) if known and len(vocab) else int(rng.integers(-(2**63), 2**63 - 1)))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(vocabs))],
        values=torch.tensor([x for bag in features for x in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for bag in features], dtype=torch.int32),
    )
    rows = vocab_rows(kjt, [torch.from_numpy(v) for v in sorted_vocabs]).numpy()
    expected = []
    for vocab, bag in zip(sorted_vocabs, features):
        for x in bag:
            hit = np.flatnonzero(vocab == x)
            expected.append(int(hit[0]) if len(hit) else len(vocab))
    assert rows.tolist() == expected
