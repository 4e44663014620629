"""The MCL loss of image-only training: SimCLR's NT-Xent where only same-pseudo-label pairs compete.

Each sample i of the (gathered) batch of N has two views, a_i and b_i, L2-normalised. The
2N views are the anchors; an anchor's positive is its other view, its negatives every
other view of the batch (2N - 2 of them), and the loss is the cross-entropy of the
positive among them at temperature tau = 1 / logit_scale (SimCLR, Chen et al. 2020),
averaged over the anchors. As in `MaskedClipLoss` (pipeline.trainer.loss), the views of
a sample whose pseudo-label differs from the anchor's are masked out of the softmax, so
negatives come only from the anchor's own cluster; entries with `valid` False (padding,
an image that did not decode) add no loss and are no one's negatives. Views are
gathered across ranks as open_clip's ClipLoss gathers features (same `local_loss` and
`gather_with_grad` options); `last_effective_negatives` is the mean number of unmasked
negatives per valid anchor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import gather_features

from pipeline.trainer.loss import gather_ids


class MaskedNTXentLoss(torch.nn.Module):
    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = rank, world_size
        self.last_effective_negatives = float("nan")

    def _gather_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return gather_ids(ids, self.world_size)

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor, logit_scale: torch.Tensor,
                labels: torch.Tensor | None = None, caption_ids: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, output_dict: bool = False):
        if caption_ids is not None:
            raise ValueError("caption_dedup does not apply to image-only training")
        device, b = view_a.device, view_a.shape[0]
        if self.world_size > 1:
            all_a, all_b = gather_features(view_a, view_b, self.local_loss, self.gather_with_grad,
                                           self.rank, self.world_size)
        else:
            all_a, all_b = view_a, view_b
        n = all_a.shape[0]
        views = torch.cat([all_a, all_b])  # [2N, D]: sample j's views at j and N + j
        if self.local_loss and self.world_size > 1:
            mine = torch.arange(b, device=device) + b * self.rank
            rows = torch.cat([mine, mine + n])
            anchors = torch.cat([view_a, view_b])
        else:
            rows = torch.arange(2 * n, device=device)
            anchors = views
        logits = logit_scale * anchors @ views.T  # [R, 2N]
        positive = (rows + n) % (2 * n)
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[torch.arange(len(rows), device=device), rows] = True  # an anchor is not its own negative
        row_valid = None
        if labels is not None:
            ids = self._gather_ids(labels.to(device)).repeat(2)
            mask |= ids[rows][:, None] != ids[None, :]
        if valid is not None:
            ok = self._gather_ids(valid.to(device).to(torch.int64)).bool().repeat(2)
            row_valid = ok[rows]
            mask |= ~row_valid[:, None] | ~ok[None, :]
        mask[torch.arange(len(rows), device=device), positive] = False  # the positive always competes
        mask[torch.arange(len(rows), device=device), rows] = True
        logits = logits.masked_fill(mask, float("-inf"))
        negatives = (~mask).sum(1).float() - 1
        per_row = F.cross_entropy(logits, positive, reduction="none")
        if row_valid is None:
            loss = per_row.mean()
            self.last_effective_negatives = negatives.mean().item()
        else:
            n_valid = row_valid.sum()
            loss = (per_row * row_valid).sum() / n_valid.clamp(min=1)
            self.last_effective_negatives = negatives[row_valid].mean().item() if n_valid > 0 else 0.0
        return {"contrastive_loss": loss} if output_dict else loss
