"""The training loaders: shards to batches, and for stage >= 2 batches from one pseudo-label group.

    build.py           the one builder training calls (make_stream): global | slot | off
    groups.py          pseudo-label groups, their fallback to a parent, one id per coarse group
    global_batches.py  the global plan: every rank's batches of a step from one group (torch-free)
    global_stream.py   reads the plan's samples by byte offset (the sidecars' index)
    slot.py            the streamed loader: plain batches, or per-slot bucketing (buckets.py)
    labels.py          sample -> pseudo-label for the streamed loader
    decode.py          one batch plan -> a Batch (batch.py), the same for every loader
    workers.py         DataLoader workers: which stream each plays, a safe start
    progress.py        the loader's counters of an epoch (loader_stats.jsonl, checkpoints)
"""
