"""How fast a stage trains and what holds it back, measured on the main rank.

Each log step's record in metrics.jsonl gets, over the steps since the previous log step:

    data_wait_share            time the trainer waited for its next batch / step time
                               (near 0: the loader keeps up; near 1: the GPUs wait on data)
    samples_per_s_per_device   the rank's batch size / mean step time
    mfu                        model FLOPs utilisation, an estimate: FLOPs per sample (one
                               sample's forward, counted once with torch.utils.flop_counter,
                               x 3 for forward and backward) x samples/s per device / the
                               device's peak (`peak_tflops`, default from PEAK_TFLOPS by the
                               GPU's name); null where no peak is known (the CPU)

Step time runs from the end of one step to the end of the next (the first of an epoch from
the epoch's start, so the workers' start counts as waiting). It is taken on the host: the
metrics log reads each step's loss, which waits for the device. A frozen tower's backward
costs less than twice its forward, so with locked towers the x 3 overstates the FLOPs
done: MFU is an upper estimate there, comparable between runs of the same config.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Iterable, Iterator

import torch

log = logging.getLogger("pipeline.train")

# Dense bf16 peak TFLOP/s by a substring of torch.cuda.get_device_name (first match wins;
# the vendors' data sheets, without sparsity).
PEAK_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("A40", 150.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0), ("V100", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("MI300X", 1307.0), ("MI250X", 383.0),
)


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """The device's peak TFLOP/s: the config's value, else the table's for a known GPU, else None."""
    if configured:
        return float(configured)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def flops_per_sample(model: torch.nn.Module, image: torch.Tensor, tokens: torch.Tensor) -> float:
    """Training FLOPs per sample: one sample's forward through both towers (`image` [1, 3, H, W]
    normalised, `tokens` [1, L]) counted by torch's FlopCounterMode, x 3 (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter, was_training = FlopCounterMode(display=False), model.training
    devices = [image.device] if image.device.type == "cuda" else []
    model.eval()  # a train-mode forward would move batch-norm statistics
    try:  # nor may it draw from the RNGs a resumed run restored
        with torch.random.fork_rng(devices=devices), torch.no_grad(), counter:
            model(image, tokens)
    finally:
        model.train(was_training)
    return 3.0 * counter.get_total_flops()


class Throughput:
    """Data wait, samples/s per device and MFU of the main rank's steps: per log window and
    for the whole stage."""

    def __init__(self, batch_size: int, flops: float | None = None, peak: float | None = None):
        self.batch_size, self.flops, self.peak = batch_size, flops, peak
        self.last = time.perf_counter()
        self.pending_wait = 0.0
        self.window = [0.0, 0.0, 0]  # wait, time, steps
        self.total = [0.0, 0.0, 0]

    def epoch_start(self) -> None:
        """Step times count from here (what happens between epochs is not a step's)."""
        self.last, self.pending_wait = time.perf_counter(), 0.0

    def timed(self, batches: Iterable) -> Iterator:
        """`batches`, with the time spent waiting for each one recorded."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.pending_wait += time.perf_counter() - t0
            yield batch

    def step_done(self) -> None:
        now = time.perf_counter()
        elapsed, wait = now - self.last, min(self.pending_wait, now - self.last)
        self.last, self.pending_wait = now, 0.0
        for acc in (self.window, self.total):
            acc[0] += wait
            acc[1] += elapsed
            acc[2] += 1

    def _figures(self, acc: list) -> dict:
        wait, elapsed, steps = acc
        if not steps or elapsed <= 0:
            return {}
        sps = steps * self.batch_size / elapsed
        mfu = None
        if self.flops and self.peak:
            mfu = self.flops * sps / (self.peak * 1e12)
            mfu = mfu if math.isfinite(mfu) else None
        return {"data_wait_share": wait / elapsed, "samples_per_s_per_device": sps, "mfu": mfu}

    def take_window(self) -> dict:
        """The figures of the steps since the previous call."""
        figures = self._figures(self.window)
        self.window = [0.0, 0.0, 0]
        return figures

    def summary(self) -> dict:
        """The stage's figures over all its steps in this process, with what MFU is based on."""
        return {**self._figures(self.total), "steps": self.total[2], "flops_per_sample": self.flops,
                "peak_tflops": self.peak}

    def describe(self) -> str:
        s = self.summary()
        if not s.get("steps"):
            return "throughput: no steps taken"
        mfu = f"MFU {100 * s['mfu']:.1f}% of {s['peak_tflops']:g} TFLOP/s" if s["mfu"] is not None else \
            "MFU unknown (no peak_tflops for this device)"
        return (f"throughput over {s['steps']} steps: {s['samples_per_s_per_device']:.1f} samples/s per device, "
                f"waiting for data {100 * s['data_wait_share']:.1f}% of step time, {mfu}")
