"""What the small SAM preset's token grid costs: encoder and decoder time on one CPU thread.

The small preset was trained at 256 px, 16 x 16 tokens of 16 px, and missed small regions and boundaries; it now
runs at 384 px, 24 x 24 tokens (``alignsam.sam.SAM_PRESETS['small']``, ``benchmarks/results/small_sam.md``). This
times the same architecture at 256 px, at 384 px, and with 8 px patches at 256 px (32 x 32 tokens). Weights are
random: only the cost is measured. Writes ``benchmarks/results/sam_token_grid_cost``.

    python -m benchmarks.sam_token_grid_cost --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from alignsam.sam import build_sam, get_spec
from benchmarks.common import RESULTS, write_results

VARIANTS = ((256, 16), (384, 16), (256, 8))
"""(input size, patch size) pairs: the preset as trained through run 7, the preset now, and a finer patch."""


def time_variant(image_size: int, patch_size: int, prompts: int, repeat: int) -> dict[str, float]:
    spec = dataclasses.replace(get_spec("small"), image_size=image_size, patch_size=patch_size)
    sam = build_sam(spec).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, image_size, image_size, generator=g)
    points = torch.rand(prompts, 8, 2, generator=g) * image_size
    labels = torch.randint(0, 2, (prompts, 8), generator=g)
    with torch.inference_mode():
        emb = sam.image_encoder(image)
        sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        pe = sam.prompt_encoder.get_dense_pe()

        def encode() -> None:
            sam.image_encoder(image)

        def decode() -> None:  # one image, ``prompts`` prompt sets: the decoder's work for as many images
            sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                             dense_prompt_embeddings=dense, multimask_output=False)

        out = {}
        for name, fn in (("encoder_ms_per_image", encode), ("decoder_ms_per_prompt", decode)):
            fn()
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            per = prompts if name.startswith("decoder") else 1
            out[name] = 1000.0 * sorted(times)[len(times) // 2] / per
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=40, help="prompt sets per decoder call (a rollout batch)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {"prompts_per_decoder_call": args.prompts, "variants": {}}
    rows = []
    base = None
    for image_size, patch_size in VARIANTS:
        r = time_variant(image_size, patch_size, args.prompts, args.repeat)
        base = base or r
        grid = image_size // patch_size
        results["variants"][f"{image_size}px/patch{patch_size}"] = {"tokens": grid * grid, **r}  # type: ignore[index]
        rows.append((
            f"{image_size} px, patch {patch_size}", f"{grid} x {grid}",
            f"{r['encoder_ms_per_image']:.1f}", f"{r['encoder_ms_per_image'] / base['encoder_ms_per_image']:.1f}x",
            f"{r['decoder_ms_per_prompt']:.2f}", f"{r['decoder_ms_per_prompt'] / base['decoder_ms_per_prompt']:.1f}x",
        ))
        print(rows[-1], flush=True)
    path = write_results("sam_token_grid_cost", results, rows, (
        "small preset variant", "tokens", "encoder ms / image", "vs 256 px", "decoder ms / prompt", "vs 256 px",
    ), RESULTS)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
