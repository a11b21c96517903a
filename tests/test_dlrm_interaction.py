"""recmem's DotInteraction computes exactly what torchrec's InteractionArch does, gradients included."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.models.dlrm import InteractionArch

from recmem.models.dlrm import DotInteraction


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 9), features=st.integers(0, 7), dim=st.integers(1, 6), seed=st.integers(0, 999))
def test_same_output_and_gradients_as_torchrec(batch, features, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, dim, generator=generator, requires_grad=True)
    sparse = torch.randn(batch, features, dim, generator=generator, requires_grad=True)
    ours, theirs = DotInteraction(features), InteractionArch(features)
    out, ref = ours(dense, sparse), theirs(dense, sparse)
    assert torch.equal(out, ref)
    upstream = torch.randn(ref.shape, generator=generator)
    grads = torch.autograd.grad(out, (dense, sparse), upstream, allow_unused=True)
    expected = torch.autograd.grad(ref, (dense, sparse), upstream, allow_unused=True)
    for got, want in zip(grads, expected):
        assert (got is None and want is None) or torch.allclose(got, want, atol=1e-5)
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # old checkpoints still load
