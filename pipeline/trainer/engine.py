"""The training engine: one interface over plain or DDP training and DeepSpeed ZeRO.

`create_engine` builds open_clip's AdamW over the model and wraps both for the run. The
trainer then calls `engine.model(...)` under `engine.autocast()`, `engine.backward(loss)`,
`engine.step()` (which also clamps the logit scale, as open_clip does), `engine.unwrap()`
for the plain open_clip model, and `engine.save` / `engine.load` for the model and
optimizer part of a checkpoint (pipeline.trainer.checkpoints names, fills and prunes them).
"""
from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import ContextManager

import torch

from common.io import atomic_path, write_json
from pipeline.trainer.distributed import DistInfo, barrier
from pipeline.trainer.config import TrainConfig


def autocast(precision: str, device: torch.device) -> ContextManager:
    """bf16 autocast for `bf16`, and for `auto` on a GPU; otherwise fp32 (no context)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms and the logit scale."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd}]


def create_engine(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> "Engine":
    """AdamW over `model` (fused unless DeepSpeed or `cfg.fused` says otherwise), wrapped for `cfg.engine`."""
    fused = cfg.engine != "deepspeed" if cfg.fused is None else cfg.fused
    optimizer = torch.optim.AdamW(param_groups(model, cfg.wd), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, fused=fused or None)
    return (DeepSpeedEngine if cfg.engine == "deepspeed" else Engine)(model, optimizer, cfg, info)


class Engine:
    """One process, or DDP: AdamW steps with optional gradient clipping. A checkpoint is
    one file, `<tag>.pt`: the resume state plus the model's and the optimizer's."""
    record_glob = "step_*.pt"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 info: DistInfo):
        self.info, self.precision, self.grad_clip = info, cfg.precision, cfg.grad_clip
        self.model, self.optimizer = self._wrap(model, optimizer, cfg)

    def _wrap(self, model, optimizer, cfg: TrainConfig):
        if self.info.distributed:
            cuda = self.info.device.type == "cuda"
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.info.device.index] if cuda else None)
        return model, optimizer

    def unwrap(self) -> torch.nn.Module:
        """The open_clip model itself."""
        return getattr(self.model, "module", self.model)

    def autocast(self) -> ContextManager:
        return autocast(self.precision, self.info.device)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        """Apply the gradients, clear them, and clamp the logit scale to [0, log 100]."""
        self._update()
        with torch.no_grad():
            self._clamp(self.unwrap().logit_scale, 0, math.log(100))

    def _clamp(self, param: torch.nn.Parameter, low: float, high: float) -> None:
        param.clamp_(low, high)

    def _update(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path, tag: str, state: dict) -> None:
        """Write checkpoint `tag` holding `state` (every rank calls this)."""
        if self.info.is_main:
            state = {**state, "state_dict": self.unwrap().state_dict(), "optimizer": self.optimizer.state_dict()}
            with atomic_path(folder / f"{tag}.pt") as tmp:
                torch.save(state, tmp)

    def load(self, folder: Path, tag: str) -> dict:
        """Load checkpoint `tag` into the model and optimizer; returns its state."""
        state = torch.load(folder / f"{tag}.pt", map_location="cpu", weights_only=True)
        self.unwrap().load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state

    def remove(self, folder: Path, tag: str) -> None:
        (folder / f"{tag}.pt").unlink(missing_ok=True)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (`cfg.zero_stage`): DeepSpeed steps and clips. A checkpoint is
    DeepSpeed's `<tag>/` folder, the resume state in `<tag>.state.pt`, and `<tag>.json`,
    written last, saying it is complete."""
    record_glob = "step_*.json"

    def _wrap(self, model, optimizer, cfg: TrainConfig):
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": cfg.zero_stage},
            "gradient_clipping": cfg.grad_clip or 0.0,
            "steps_per_print": 10 ** 9,
            "wall_clock_breakdown": False,
        }
        if self.info.distributed:
            deepspeed.init_distributed(dist_backend=self.info.backend, auto_mpi_discovery=False)
        # DeepSpeed broadcasts parameters as byte views, which 0-dim tensors (open_clip's
        # logit_scale) cannot give: make them 1-dim; models.save_model restores the shape.
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.dim() == 0:
                    p.data = p.data.reshape(1)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                          dist_init_required=False)
        return engine, ds_optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def _clamp(self, param: torch.nn.Parameter, low: float, high: float) -> None:
        """Clamp the module's copy and ZeRO's fp32 master of `param`: the optimizer steps the
        master and copies it over the module's copy, so a clamp of the module alone would let
        the master drift past the bound (and the next steps climb back from there). Each rank
        clamps the fragment of the master it holds."""
        param.clamp_(low, high)
        mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2 (deepspeed.utils.tensor_fragment)
        if mapping is not None:
            mapping.get_hp_fragment().clamp_(low, high)

    def _update(self) -> None:
        self.model.step()

    def save(self, folder: Path, tag: str, state: dict) -> None:
        self.model.save_checkpoint(str(folder), tag=tag, client_state={}, save_latest=False)
        barrier(self.info)
        if self.info.is_main:
            with atomic_path(folder / f"{tag}.state.pt") as tmp:
                torch.save(state, tmp)
            write_json(folder / f"{tag}.json", {"step": state["step"], "tag": tag})

    def load(self, folder: Path, tag: str) -> dict:
        self.model.load_checkpoint(str(folder), tag=tag, load_module_strict=True,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        return torch.load(folder / f"{tag}.state.pt", map_location="cpu", weights_only=True)

    def remove(self, folder: Path, tag: str) -> None:
        (folder / f"{tag}.json").unlink(missing_ok=True)
        (folder / f"{tag}.state.pt").unlink(missing_ok=True)
        shutil.rmtree(folder / tag, ignore_errors=True)
