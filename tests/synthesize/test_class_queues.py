import pytest
import torch

from npos.errors import ParameterError
from npos.synthesize import ClassQueues


def test_fifo_order_and_ready_mask():
    q = ClassQueues(3, capacity=4, dim=2)
    assert not q.all_ready() and q.ready.tolist() == [False, False, False]
    pushed = {c: [] for c in range(3)}
    g = torch.Generator().manual_seed(0)
    value = 0
    for batch in (5, 1, 9, 3, 7):
        y = torch.randint(0, 2, (batch,), generator=g)  # class 2 never gets rows
        x = torch.arange(value, value + batch, dtype=torch.float32)[:, None].repeat(1, 2)
        value += batch
        q.push(x, y)
        for row, c in zip(x, y.tolist()):
            pushed[c].append(row)
        for c in range(3):
            expected = torch.stack(pushed[c][-4:]) if pushed[c] else torch.zeros(0, 2)
            assert torch.equal(q.ordered(c), expected)
            assert int(q.counts[c]) == min(len(pushed[c]), 4)
    assert q.ready.tolist() == [True, True, False] and not q.all_ready()
    # banks hold exactly the queue contents (in ring order)
    assert sorted(q.banks[0, :, 0].tolist()) == sorted(r[0].item() for r in pushed[0][-4:])
    q.push(torch.ones(1, 2), torch.tensor([2]))
    assert q.ready.tolist() == [True, True, False]


def test_batch_larger_than_capacity_keeps_last_rows():
    q = ClassQueues(2, capacity=3, dim=1, dtype=torch.float64)
    x = torch.arange(10, dtype=torch.float32)[:, None]
    y = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0, 1, 1])
    q.push(x, y)
    assert q.ordered(0).flatten().tolist() == [4.0, 5.0, 7.0]
    assert q.ordered(1).flatten().tolist() == [6.0, 8.0, 9.0]
    assert q.banks.dtype == torch.float64 and q.all_ready()
    x.requires_grad_(True)
    q.push(x[:2] * 2, torch.tensor([1, 1]))
    assert q.ordered(1).flatten().tolist() == [9.0, 0.0, 2.0]
    assert not q.banks.requires_grad


def test_push_errors():
    q = ClassQueues(2, capacity=3, dim=4)
    with pytest.raises(ParameterError, match=r"push expects x of shape \(B, 4\)"):
        q.push(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ParameterError, match=r"push expects y of shape \(2,\)"):
        q.push(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ParameterError, match=r"labels outside \[0, 2\)"):
        q.push(torch.zeros(2, 4), torch.tensor([0, -1]))
    with pytest.raises(ParameterError, match=r"The 'capacity' parameter must be an int"):
        ClassQueues(2, capacity=0, dim=4)
