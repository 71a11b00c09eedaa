"""Objectives beyond the model's weighted next-token loss: DPO on stored token sequences.

DPO (Rafailov et al. 2023) as Emu3 uses it (seed 002): for a prompt with a chosen and a rejected
continuation (the exact ids the generator produced), with log-probabilities summed over each
continuation under the policy (pi) and under the frozen reference model (ref, computed once):

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))  +  sft_weight * NLL(chosen)

where NLL is the mean per-token negative log-likelihood of the chosen continuation. Emu3-DPO: beta
0.5 (the "KL penalty"), sft_weight 0.2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(next token) over the positions in `mask` (B, L), and their count, per row.

    Position i predicts ids[i + 1]; right-padded rows are fine (pads come after the masked part).
    """
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = torch.where(mask[:, :-1], ids[:, 1:], -100)
    ce = model(ids, labels=labels, reduction="none")  # (B, L)
    return -ce.sum(1), (labels != -100).sum(1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair DPO loss from summed log-probabilities."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)
