"""Speed of the perception half: SAM encoder, batched decoder, CLIP-Surgery map, one episode.

    python -m benchmarks.bench_perception [--presets vit_b small] [--device cpu|cuda]

Writes benchmarks/results/perception_<device>.json and .md. Same as `alignsam bench`.
"""

from __future__ import annotations

import argparse

import torch

from alignsam.bench import run_perception_bench
from alignsam.loading import resolve_device
from benchmarks.common import RESULTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["vit_b", "small"])
    ap.add_argument("--device", default=resolve_device("auto"))
    ap.add_argument("--image-side", type=int, default=800)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clip-model", default="ViT-B-16")
    ap.add_argument("--name", default=None, help="results file name (default: perception_<device>)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_perception_bench(RESULTS, args.presets, args.device, args.image_side, args.steps, args.repeat,
                         args.clip_model, args.name)


if __name__ == "__main__":
    main()
