"""Small synthetic data for the learning tests: a bright disc on a dark textured background."""

from __future__ import annotations

import numpy as np

from alignsam.data import Sample


def bright_disc_samples(n: int, seed: int, size: int = 128) -> list[Sample]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    samples = []
    for i in range(n):
        image = rng.integers(0, 70, (size, size, 3)).astype(np.uint8)
        r = rng.uniform(0.12, 0.22) * size
        cx, cy = rng.uniform(r, size - r, 2)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        image[mask] = (rng.integers(200, 256), rng.integers(180, 240), rng.integers(0, 60))
        samples.append(Sample(image=image, mask=mask, text="bright disc", name=f"disc{seed}_{i:03d}"))
    return samples
