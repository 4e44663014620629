"""The masked contrastive loss against open_clip's ClipLoss, in one and in two processes."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from pipeline.loss import MaskedClipLoss


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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
