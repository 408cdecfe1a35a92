"""Cross-process helpers are the identity on one process (their 2-process behaviour: test_two_processes.py)."""
import torch

from twinfold.losses import average_gradient, gather_no_grad, gather_with_grad, rank_offset


def test_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_no_grad(x) is x
    assert average_gradient(x) is x
    assert rank_offset(7) == 0
