"""The masked contrastive loss against open_clip's ClipLoss, in one and in two processes."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from pipeline.trainer.loss import MaskedClipLoss


def _features(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    return img, txt, scale


def _value_and_grads(loss_fn, img, txt, scale, **kw):
    img, txt, scale = (t.detach().clone().requires_grad_() for t in (img, txt, scale))
    loss = loss_fn(img, txt, scale, **kw)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def _reference_masked(img, txt, scale, allowed):
    """InfoNCE computed pair by pair: row i's softmax runs over allowed[i] only."""
    logits = scale * img @ txt.T
    n = len(img)
    total = 0.0
    for i in range(n):
        cols = [j for j in range(n) if allowed[i][j] or j == i]
        li = logits[i, cols]
        total = total - torch.log_softmax(li, 0)[cols.index(i)]
        lt = logits[cols, i]  # text i against images of its row set
        total = total - torch.log_softmax(lt, 0)[cols.index(i)]
    return total / (2 * n)


def test_one_label_equals_clip_loss_value_and_gradients():
    img, txt, scale = _features()
    ours = _value_and_grads(MaskedClipLoss(), img, txt, scale, labels=torch.zeros(12, dtype=torch.long))
    ref = _value_and_grads(ClipLoss(), img, txt, scale)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and no labels at all is the same thing
    torch.testing.assert_close(_value_and_grads(MaskedClipLoss(), img, txt, scale)[0], ref[0], rtol=0, atol=1e-6)


def test_cross_label_pairs_never_reach_the_softmax():
    img, txt, scale = _features()
    labels = torch.tensor([0, 1] * 6)
    loss_fn = MaskedClipLoss()
    loss = loss_fn(img, txt, scale, labels=labels)
    allowed = (labels[:, None] == labels[None, :]).tolist()
    torch.testing.assert_close(loss, _reference_masked(img, txt, scale, allowed), rtol=1e-5, atol=1e-6)
    assert loss_fn.last_effective_negatives == 5.0  # 6 per label, minus the positive
    # moving a sample's text far along another label's images changes nothing for that other label
    loss.backward()
    g_img = img.grad.clone()
    txt2 = txt.detach().clone()
    txt2[1] = img.detach()[0]  # a label-1 caption made identical to a label-0 image
    img.grad = None
    loss2 = loss_fn(img, txt2, scale, labels=labels)
    loss2.backward()
    for i in range(0, 12, 2):  # label-0 images: same gradient as before
        torch.testing.assert_close(img.grad[i], g_img[i], rtol=1e-5, atol=1e-7)


def test_identical_captions_are_not_negatives_but_positives_stay():
    img, txt, scale = _features()
    caption_ids = torch.tensor([7, 7, 7, 1, 2, 3, 4, 5, 6, 8, 9, 10])
    loss_fn = MaskedClipLoss()
    loss = loss_fn(img, txt, scale, caption_ids=caption_ids)
    allowed = (caption_ids[:, None] != caption_ids[None, :]).tolist()
    torch.testing.assert_close(loss, _reference_masked(img, txt, scale, allowed), rtol=1e-5, atol=1e-6)
    assert loss_fn.last_effective_negatives == pytest.approx((3 * 9 + 9 * 11) / 12)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("local_loss", [False, True])  # one process: local is the global loss
def test_invalid_entry_is_no_negative_in_either_direction(local_loss):
    """An invalid entry (a corrupt image) with a real label and real features: the loss, its
    gradients and the negatives count are those of the batch with the entry removed."""
    img, txt, scale = _features()
    keep = [i for i in range(12) if i != 4]
    valid = torch.ones(12, dtype=torch.bool)
    valid[4] = False
    img2 = img.detach().clone()
    img2[4] = txt.detach()[0]  # its image matches caption 0: a strong negative if it were one
    # one label: the reference is open_clip's ClipLoss on the 11 valid entries
    loss_fn = MaskedClipLoss(local_loss=local_loss)
    ours = _value_and_grads(loss_fn, img2, txt, scale, labels=torch.zeros(12, dtype=torch.long), valid=valid)
    ref = _value_and_grads(ClipLoss(), img2[keep], txt[keep], scale)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1][keep], ref[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[2][keep], ref[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[3], ref[3], rtol=1e-5, atol=1e-7)
    assert ours[1][4].abs().max() == 0 and ours[2][4].abs().max() == 0
    assert loss_fn.last_effective_negatives == 10.0
    # two labels, the invalid entry sharing label 0 with caption 0
    labels = torch.tensor([0, 1] * 6)
    loss = loss_fn(img2, txt, scale, labels=labels, valid=valid)
    sub = labels[keep]
    allowed = (sub[:, None] == sub[None, :]).tolist()
    torch.testing.assert_close(loss, _reference_masked(img2[keep], txt[keep], scale, allowed),
                               rtol=1e-5, atol=1e-6)
    assert loss_fn.last_effective_negatives == pytest.approx((5 * 4 + 6 * 5) / 11)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_INVALID = 1  # on rank 0; label 0, like entries 0, 4, 7 and 10 on both ranks


def _two_process_worker(rank, port, results, local_loss):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    img, txt, scale = _features(n=12, seed=3)
    sl = slice(rank * 6, rank * 6 + 6)
    labels_all = torch.tensor([0, 0, 1, 1, 0, 2, 1, 0, 2, 2, 0, 1])
    out = {}
    for name, fn, kw in [
        ("clip", ClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=2), {}),
        ("ours_one_label", MaskedClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=2),
         {"labels": torch.zeros(6, dtype=torch.long)}),
        ("ours_labels", MaskedClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=2),
         {"labels": labels_all[sl]}),
        ("ours_invalid", MaskedClipLoss(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=2),
         {"labels": labels_all[sl], "valid": (torch.arange(12) != _INVALID)[sl]}),
    ]:
        i, t, s = (x.detach()[sl].clone().requires_grad_() if x.dim() else x.detach().clone().requires_grad_()
                   for x in (img, txt, scale))
        loss = fn(i, t, s, **kw)
        loss.backward()
        out[name] = (loss.detach(), i.grad, t.grad, s.grad)
    results[rank] = out
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_processes_equal_clip_loss_and_mask_across_ranks(local_loss):
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(_two_process_worker, args=(_free_port(), results, local_loss),
                                              nprocs=2, start_method="spawn")
        results = dict(results)
    img, txt, scale = _features(n=12, seed=3)
    labels_all = torch.tensor([0, 0, 1, 1, 0, 2, 1, 0, 2, 2, 0, 1])
    allowed = (labels_all[:, None] == labels_all[None, :]).tolist()
    full_masked = _reference_masked(img, txt, scale, allowed)
    full_clip = ClipLoss()(img, txt, scale)
    for rank in (0, 1):
        r = results[rank]
        for a, b in zip(r["ours_one_label"], r["clip"]):  # value and every gradient
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        if not local_loss:  # each rank computes the whole batch's loss
            torch.testing.assert_close(r["clip"][0], full_clip, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["ours_labels"][0], full_masked, rtol=1e-5, atol=1e-6)
    if local_loss:  # each rank's share of the rows; their mean is the whole loss
        mean = (results[0]["ours_labels"][0] + results[1]["ours_labels"][0]) / 2
        torch.testing.assert_close(mean, full_masked, rtol=1e-5, atol=1e-6)
    # the invalid entry counts as if removed from the batch: no anchor, no negative in either direction
    keep = [i for i in range(12) if i != _INVALID]
    sub = labels_all[keep]
    without = _reference_masked(img[keep], txt[keep], scale, (sub[:, None] == sub[None, :]).tolist())
    if local_loss:  # rank 0 averages its 5 valid rows, rank 1 its 6
        weighted = (5 * results[0]["ours_invalid"][0] + 6 * results[1]["ours_invalid"][0]) / 11
        torch.testing.assert_close(weighted, without, rtol=1e-5, atol=1e-6)
    else:
        for rank in (0, 1):
            torch.testing.assert_close(results[rank]["ours_invalid"][0], without, rtol=1e-5, atol=1e-6)
    # its features (on rank 0) get no gradient, from either rank's loss (the gather carries gradients back)
    assert results[0]["ours_invalid"][1][_INVALID].abs().max() == 0
    assert results[0]["ours_invalid"][2][_INVALID].abs().max() == 0
