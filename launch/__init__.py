"""Orchestration: wires the jobs of shards/, pipeline/ and eval/ into runs."""
