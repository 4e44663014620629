"""The evaluations' bootstrap at the sizes of real benchmarks: eval.stats against scipy.stats.bootstrap.

    .venv/bin/python bench/bootstrap.py [--resamples 10000] [--sizes 270 2000 50000]

Every evaluation reports each score's percentile-bootstrap 95% interval over its items (eval.stats):
MMVP-VLM's 270 pairs in 9 patterns, a CLIP_benchmark set of 2,000 images, ImageNet's 50,000.
For each size, side by side on the same outcomes (one group of n items, 10,000 resamples, the same
seed): eval.stats.interval against scipy.stats.bootstrap(method="percentile", vectorized, one
batch; for the largest size in batches of 200 resamples, as a user would have to: one batch would
need resamples x items x 8 bytes twice), each one's seconds and peak memory (tracemalloc: numpy's
arrays are traced), their ratio, and whether the two intervals are equal (they must be: the same
draws). Then the demo's pooled test over 3 seeds (eval.stats.pooled) at the same sizes.
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval import stats as S  # noqa: E402


def measured(fn):
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak / 2 ** 20


def main() -> None:
    from scipy.stats import bootstrap

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--sizes", type=int, nargs="+", default=[270, 2000, 50_000])
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'items':>7} {'ours s':>8} {'ours MiB':>9} {'scipy s':>8} {'scipy MiB':>10} {'time ratio':>11} "
          f"{'memory ratio':>13}  equal")
    for n in args.sizes:
        outcomes = rng.binomial(1, 0.3, n).astype(float)
        ours, t_ours, m_ours = measured(lambda: S.interval([outcomes], args.resamples, seed=0))
        batch = 200 if n > 10_000 else None
        ref, t_ref, m_ref = measured(lambda: bootstrap(
            (outcomes,), np.mean, n_resamples=args.resamples, method="percentile", batch=batch,
            rng=np.random.default_rng(0)).confidence_interval)
        equal = abs(ours["low"] - 100 * ref.low) < 1e-4 and abs(ours["high"] - 100 * ref.high) < 1e-4
        print(f"{n:>7} {t_ours:>8.2f} {m_ours:>9.1f} {t_ref:>8.2f} {m_ref:>10.1f} {t_ref / t_ours:>10.2f}x "
              f"{m_ref / m_ours:>12.2f}x  {equal}")
    print("pooled over 3 seeds (eval.stats.pooled, items shared by the seeds):")
    for n in args.sizes:
        a = [{"set": rng.binomial(1, 0.5, n)} for _ in range(3)]
        b = [{"set": rng.binomial(1, 0.4, n)} for _ in range(3)]
        rec, seconds, peak = measured(lambda: S.pooled(a, b, resamples=args.resamples))
        print(f"{n:>7} items: {seconds:.2f} s, peak {peak:.1f} MiB, difference {rec['diff']:+.1f} "
              f"[{rec['low']:.1f}, {rec['high']:.1f}]")


if __name__ == "__main__":
    main()
