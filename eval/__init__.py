"""Evaluation: MMVP-VLM zero-shot scoring, attribute probes, plots."""
