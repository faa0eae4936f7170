"""Speed of the perception half: SAM encoder, batched decoder, CLIP-Surgery map, one episode.

Prints, per SAM preset (random weights are fine for timing): encoder time per image, decoder time
per step for 1 and 16 images, the CLIP-Surgery map time, and the cost of one 15-step episode on a
cached embedding relative to one encoder pass (target for vit_b: < 15%).

    python benchmarks/bench_perception.py [--presets vit_b small] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alignsam.env import EnvConfig, PromptEnv  # noqa: E402
from alignsam.sam import FrozenSam  # noqa: E402
from benchmarks.common import timeit, write_results  # noqa: E402


def bench_preset(preset: str, device: str, image_side: int, steps: int, repeat: int) -> dict[str, float]:
    sam = FrozenSam.from_preset(preset, device=device, cache_size=4)
    rng = np.random.default_rng(0)
    counter = iter(range(10_000))

    def fresh_image() -> np.ndarray:
        return rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8) ^ next(counter) % 255

    enc_repeat = 2 if preset.startswith("vit") and device == "cpu" else repeat
    enc = timeit(lambda: sam.embed(fresh_image()), repeat=enc_repeat, warmup=1, device=device)

    emb = sam.embed(fresh_image())
    size = emb.original_size
    out: dict[str, float] = {"encoder_ms": enc["median_ms"]}
    for b in (1, 16):
        feats = emb.features[None].expand(b, -1, -1, -1).contiguous()
        pts = torch.tensor(rng.uniform(0, image_side, (b, 1 + steps // 2, 2)), dtype=torch.float32)
        labels = torch.tensor(rng.integers(0, 2, (b, 1 + steps // 2)))
        res = timeit(lambda f=feats, p=pts, lab=labels: sam.decode(f, p, lab, size, return_probs=False),
                     repeat=repeat, device=device)
        out[f"decode_b{b}_ms"] = res["median_ms"]
        out[f"decode_b{b}_per_image_ms"] = res["median_ms"] / b

    gt = np.zeros(size, bool)
    gt[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = True
    for b in (1, 16):
        env = PromptEnv(sam, emb.features[None], [size], [gt], EnvConfig(steps=steps))
        idx = torch.zeros(b, dtype=torch.long)

        def episode(env: PromptEnv = env, idx: torch.Tensor = idx, b: int = b) -> None:
            env.reset(idx, generator=torch.Generator().manual_seed(0))
            for t in range(steps):
                env.step(torch.full((b,), t, dtype=torch.long), torch.ones(b, dtype=torch.long))

        res = timeit(episode, repeat=repeat, device=device)
        out[f"episode_b{b}_ms"] = res["median_ms"]
        out[f"episode_b{b}_per_image_ms"] = res["median_ms"] / b
    out["episode_over_encoder"] = out["episode_b1_ms"] / out["encoder_ms"]
    out["episode_b16_per_image_over_encoder"] = out["episode_b16_per_image_ms"] / out["encoder_ms"]
    return out


def bench_clip(model: str, device: str, image_side: int, repeat: int) -> dict[str, float]:
    from alignsam.clip_surgery import ClipSurgery

    clip = ClipSurgery(model_name=model, pretrained=None, device=device)
    rng = np.random.default_rng(1)
    clip.similarity_map(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8), "shadow")

    def one() -> None:  # a new image each time: measure the work, not the cache
        clip.similarity_map(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8), "shadow")

    return {"clip_map_ms": timeit(one, repeat=repeat, device=device)["median_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["vit_b", "small"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--image-side", type=int, default=800)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clip-model", default="ViT-B-16")
    ap.add_argument("--name", default=None, help="results file name (default: perception_<device>)")
    args = ap.parse_args()
    torch.manual_seed(0)

    results: dict[str, object] = {"device": args.device, "image_side": args.image_side, "steps": args.steps}
    rows = []
    for preset in args.presets:
        r = bench_preset(preset, args.device, args.image_side, args.steps, args.repeat)
        results[preset] = r
        print(f"[{preset}] " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
        rows.append((
            preset, f"{r['encoder_ms']:.1f}", f"{r['decode_b1_ms']:.2f}", f"{r['decode_b16_per_image_ms']:.2f}",
            f"{r['episode_b1_ms']:.1f}", f"{100 * r['episode_over_encoder']:.1f}%",
            f"{100 * r['episode_b16_per_image_over_encoder']:.1f}%",
        ))
    clip = bench_clip(args.clip_model, args.device, args.image_side, args.repeat)
    results[f"clip_{args.clip_model}"] = clip
    print(f"[clip {args.clip_model}] clip_map_ms={clip['clip_map_ms']:.1f}")
    rows.append((f"CLIP-Surgery {args.clip_model} map", f"{clip['clip_map_ms']:.1f}", "", "", "", "", ""))
    path = write_results(
        args.name or f"perception_{args.device}", results, rows,
        ("model", "encoder ms/img", "decode b1 ms", "decode b16 ms/img", f"episode T={args.steps} b1 ms",
         "episode/encoder (b1)", "episode/encoder (b16, per img)"),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
