"""What a stage's training (pipeline.train) is built from.

    config.py       TrainConfig: the train job's spec (YAML + key=value overrides)
    engine.py       DDP or DeepSpeed behind backward / step / save / load, and the precision
    checkpoints.py  which checkpoint to resume from, and the resume state it holds
    loss.py         the masked CLIP loss (cross-label pairs out of the softmax)
    distributed.py  torch.distributed from torchrun's or Slurm's environment
    log.py          metrics.jsonl and the step log lines
    trackers.py     TensorBoard and W&B
"""
