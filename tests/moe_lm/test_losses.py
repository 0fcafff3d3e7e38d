"""Balance loss and z-loss against hand-computed values."""

from __future__ import annotations

import math

import torch

from lineinspect.moe_lm.losses import IGNORE_INDEX, lm_loss, load_balancing_loss, router_z_loss


def _uniform_logits() -> torch.Tensor:
    """4 tokens, 4 experts, top-2: token n strongly prefers experts n and n+1 (mod 4).

    Every expert gets 2 of the 8 assignments (f_e = 1/4) and, by symmetry, mean probability 1/4.
    """
    logits = torch.zeros(4, 4)
    for n in range(4):
        logits[n, n] = logits[n, (n + 1) % 4] = 2.0
    return logits


def _collapsed_logits() -> torch.Tensor:
    """Every token: logits [log 3, log 3, 0, 0] -> probabilities [3/8, 3/8, 1/8, 1/8], experts 0, 1."""
    return torch.tensor([[math.log(3), math.log(3), 0.0, 0.0]]).repeat(4, 1)


def test_balance_loss_is_one_for_uniform_routing() -> None:
    # E * sum_e f_e P_e = 4 * 4 * (1/4 * 1/4) = 1
    loss = load_balancing_loss([_uniform_logits()], top_k=2)
    torch.testing.assert_close(loss, torch.tensor(1.0))


def test_balance_loss_hand_computed_for_collapsed_routing() -> None:
    # f = [1/2, 1/2, 0, 0], P = [3/8, 3/8, 1/8, 1/8]: 4 * (1/2 * 3/8 * 2) = 1.5 > 1
    collapsed = load_balancing_loss([_collapsed_logits()], top_k=2)
    torch.testing.assert_close(collapsed, torch.tensor(1.5))
    # mean over layers
    both = load_balancing_loss([_uniform_logits(), _collapsed_logits()], top_k=2)
    torch.testing.assert_close(both, torch.tensor(1.25))


def test_balance_loss_ignores_masked_tokens_and_has_a_gradient() -> None:
    logits = torch.cat([_uniform_logits(), _collapsed_logits()[:1] * 5]).requires_grad_(True)
    mask = torch.tensor([True, True, True, True, False])
    loss = load_balancing_loss([logits], top_k=2, token_mask=mask)
    torch.testing.assert_close(loss, torch.tensor(1.0))
    assert load_balancing_loss([logits], top_k=2) > 1.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:4].abs().sum() > 0
    assert torch.equal(logits.grad[4], torch.zeros(4))


def test_router_z_loss_hand_computed() -> None:
    # logsumexp([0, 0]) = log 2, logsumexp([log 3, 0]) = log 4 = 2 log 2 -> mean of squares 2.5 log^2 2
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    z = router_z_loss([logits, logits])
    torch.testing.assert_close(z, torch.tensor(2.5 * math.log(2) ** 2))
    masked = router_z_loss([logits], token_mask=torch.tensor([True, False]))
    torch.testing.assert_close(masked, torch.tensor(math.log(2) ** 2))


def test_lm_loss_skips_ignored_targets() -> None:
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = math.log(4)  # probability of token 2: 4 / (4 + 4) = 1/2
    targets = torch.tensor([[2, IGNORE_INDEX, IGNORE_INDEX]])
    torch.testing.assert_close(lm_loss(logits, targets), torch.tensor(math.log(2)))
