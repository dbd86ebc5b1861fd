"""``synthesize(..., return_candidates=True)``: every candidate vector, the kept ones equal
to the outliers, and the outliers unchanged by asking."""

from __future__ import annotations

import pytest
import torch

from npos.errors import ParameterError
from npos.synthesize import SynthesisConfig, synthesize


def test_candidates_hold_the_kept_outliers():
    banks = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(0)) * 5
    config = SynthesisConfig(k=5, select=10, pick=2, candidates=7, keep=3, sigma=0.1)
    plain = synthesize(banks, config, generator=torch.Generator().manual_seed(1))
    full = synthesize(banks, config, generator=torch.Generator().manual_seed(1),
                      return_candidates=True, memory_budget=4096)  # several class chunks
    assert torch.equal(plain.outliers, full.outliers)
    st = full.stats
    assert st.candidates.shape == (3, 2, 7, 8)
    kept = st.candidate_distance.topk(3, dim=-1).indices
    picked = st.candidates.gather(2, kept.unsqueeze(-1).expand(3, 2, 3, 8))
    torch.testing.assert_close(picked.reshape(-1, 8), full.outliers, rtol=0, atol=0)
    assert synthesize(banks, config, generator=torch.Generator().manual_seed(1),
                      return_stats=True).stats.candidates is None


def test_candidates_need_npos():
    banks = torch.randn(2, 20, 4)
    with pytest.raises(ParameterError, match="return_candidates needs method 'npos'"):
        synthesize(banks, SynthesisConfig(method="gaussian", k=3, keep=2),
                   generator=torch.Generator(), return_candidates=True)
