"""The MCL contrastive loss: CLIP InfoNCE where only same-pseudo-label pairs compete.

`MaskedClipLoss` is open_clip's `ClipLoss` (same gathering across ranks, same local-loss
option, same ground truth) with one change: the logit of a pair whose pseudo-labels
differ is set to -inf before the softmax, so an anchor's negatives come only from its own
cluster ("feature-aware negative sampling"). Positives (the diagonal) are never masked.
With one label for all samples nothing is masked and the loss equals `ClipLoss` exactly.

Option `caption_ids`: pairs with identical captions (same id) are not negatives of each
other either; web data has many duplicates, and inside a cluster they abound.

Option `valid`: entries marked False (padding of a short batch, or of a rank whose data
ran out before the others', or a sample whose image failed to decode) take no part: their
rows add no loss, and they are no one's negatives in either direction (neither a negative
caption for an image anchor nor a negative image for a caption anchor).

After each call, `last_effective_negatives` holds the mean number of unmasked negatives
per (valid) anchor, which the trainer reports.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss


def gather_ids(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's `ids` (labels, caption ids, valid flags) concatenated in rank order."""
    if world_size == 1:
        return ids
    out = [torch.empty_like(ids) for _ in range(world_size)]
    dist.all_gather(out, ids.contiguous())
    return torch.cat(out)


class MaskedClipLoss(ClipLoss):
    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size)
        self.last_effective_negatives = float("nan")

    def _gather_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return gather_ids(ids, self.world_size)

    def negative_mask(self, labels: torch.Tensor | None, caption_ids: torch.Tensor | None,
                      valid: torch.Tensor | None, n_rows: int, n_cols: int, device) -> torch.Tensor | None:
        """Bool [rows, cols]: True where the pair must NOT compete (the diagonal excluded)."""
        if labels is None and caption_ids is None and valid is None:
            return None
        local = self.local_loss and self.world_size > 1
        offset = n_cols // self.world_size * self.rank if local else 0
        rows = torch.arange(n_rows, device=device) + offset
        mask = torch.zeros(n_rows, n_cols, dtype=torch.bool, device=device)
        for kind, ids in (("label", labels), ("caption", caption_ids), ("valid", valid)):
            if ids is None:
                continue
            ids = ids.to(device)
            all_ids = self._gather_ids(ids)
            row_ids = ids if local else all_ids
            if kind == "label":
                mask |= row_ids[:, None] != all_ids[None, :]
            elif kind == "caption":
                mask |= row_ids[:, None] == all_ids[None, :]
            else:  # a pair with an invalid member never competes: its row (mask.T: its image column) too
                mask |= ~row_ids.bool()[:, None] | ~all_ids.bool()[None, :]
        mask[torch.arange(n_rows, device=device), rows] = False
        return mask

    def forward(self, image_features, text_features, logit_scale, labels=None, caption_ids=None, valid=None,
                logit_bias=None, output_dict=False):
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale,
                                                            logit_bias=logit_bias)
        n_rows, n_cols = logits_per_image.shape
        device = image_features.device
        ground_truth = self.get_ground_truth(device, n_rows)
        mask = self.negative_mask(labels, caption_ids, valid, n_rows, n_cols, device)
        row_valid = None
        if valid is not None:
            row_valid = valid.to(device).bool()
            if not (self.local_loss and self.world_size > 1):
                row_valid = self._gather_ids(row_valid.to(torch.int64)).bool()
        if mask is not None:
            # global: logits_per_text is logits_per_image.T; local: both are [this rank's rows, all columns]
            text_mask = mask if (self.local_loss and self.world_size > 1) else mask.T
            logits_per_image = logits_per_image.masked_fill(mask, float("-inf"))
            logits_per_text = logits_per_text.masked_fill(text_mask, float("-inf"))
            negatives = (~mask).sum(1).float() - 1
        else:
            negatives = torch.full((n_rows,), float(n_cols - 1))
        if row_valid is None:
            loss = (F.cross_entropy(logits_per_image, ground_truth)
                    + F.cross_entropy(logits_per_text, ground_truth)) / 2
            self.last_effective_negatives = negatives.mean().item()
        else:
            per_row = (F.cross_entropy(logits_per_image, ground_truth, reduction="none")
                       + F.cross_entropy(logits_per_text, ground_truth, reduction="none")) / 2
            n_valid = row_valid.sum()
            loss = (per_row * row_valid).sum() / n_valid.clamp(min=1)
            self.last_effective_negatives = (negatives[row_valid].mean().item() if n_valid > 0 else 0.0)
        return {"contrastive_loss": loss} if output_dict else loss
