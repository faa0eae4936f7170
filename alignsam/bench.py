"""Speed benchmarks: timing helpers, machine description, result files, and the perception bench.

The perception bench prints, per SAM preset (random weights are fine for timing): encoder time per
image, decoder time per step for 1 and 16 images, the CLIP-Surgery map time, and the cost of one
15-step episode on a cached embedding relative to one encoder pass (target for vit_b: < 15%).
The caller says where results go (``benchmarks/`` writes them under its ``results/``; ``alignsam bench --out``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from alignsam.clip_surgery import ClipSurgery
from alignsam.env import EnvConfig, PromptEnv
from alignsam.sam import FrozenSam


def machine() -> dict[str, object]:
    """What the numbers were measured on, so runs can be compared."""
    info: dict[str, object] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, device: str = "cpu") -> dict[str, float]:
    """Median / min wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeat": repeat}


def write_results(
    name: str,
    results: dict[str, object],
    table: list[tuple[str, ...]],
    headers: tuple[str, ...],
    out_dir: Path,
) -> Path:
    """Writes ``<out_dir>/<name>.json`` and ``<name>.md`` (a Markdown table); returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    payload = {"benchmark": name, "created": stamp, "machine": machine(), "results": results}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {name}", "", f"{stamp} on {payload['machine']}", ""]
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(row) + " |" for row in table]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return out_dir / f"{name}.json"


def bench_preset(preset: str, device: str, image_side: int, steps: int, repeat: int) -> dict[str, float]:
    sam = FrozenSam.from_preset(preset, device=device, cache_size=4)
    rng = np.random.default_rng(0)
    counter = iter(range(10_000))

    def fresh_image() -> np.ndarray:
        return rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8) ^ next(counter) % 255

    # A ViT-B/L/H encoder pass takes tens of seconds on a CPU: fewer repeats for the heavy parts there.
    heavy = preset.startswith("vit") and torch.device(device).type == "cpu"
    few = {"repeat": 2, "warmup": 0} if heavy else {"repeat": repeat}
    enc = timeit(lambda: sam.embed(fresh_image()), device=device, **few)
    print(f"[{preset}] encoder {enc['median_ms']:.0f} ms", flush=True)

    emb = sam.embed(fresh_image())
    size = emb.original_size
    out: dict[str, float] = {"encoder_ms": enc["median_ms"]}
    for b in (1, 16):
        feats = emb.features[None].expand(b, -1, -1, -1).contiguous()
        pts = torch.tensor(rng.uniform(0, image_side, (b, 1 + steps // 2, 2)), dtype=torch.float32)
        labels = torch.tensor(rng.integers(0, 2, (b, 1 + steps // 2)))
        res = timeit(lambda f=feats, p=pts, lab=labels: sam.decode(f, p, lab, size, return_probs=False),
                     device=device, **(few if b > 1 else {"repeat": repeat}))
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

        res = timeit(episode, device=device, **(few if heavy else {"repeat": repeat}))
        out[f"episode_b{b}_ms"] = res["median_ms"]
        out[f"episode_b{b}_per_image_ms"] = res["median_ms"] / b
    out["episode_over_encoder"] = out["episode_b1_ms"] / out["encoder_ms"]
    out["episode_b16_per_image_over_encoder"] = out["episode_b16_per_image_ms"] / out["encoder_ms"]
    return out


def bench_clip(model: str, device: str, image_side: int, repeat: int) -> dict[str, float]:
    clip = ClipSurgery(model_name=model, pretrained=None, device=device)
    rng = np.random.default_rng(1)
    clip.similarity_map(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8), "shadow")

    def one() -> None:  # a new image each time: measure the work, not the cache
        clip.similarity_map(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8), "shadow")

    return {"clip_map_ms": timeit(one, repeat=repeat, device=device)["median_ms"]}


def run_perception_bench(
    out_dir: Path,
    presets: list[str] | tuple[str, ...] = ("vit_b", "small"),
    device: str = "cpu",
    image_side: int = 800,
    steps: int = 15,
    repeat: int = 5,
    clip_model: str = "ViT-B-16",
    name: str | None = None,
) -> dict[str, object]:
    """Runs the perception bench, prints a line per model and writes ``<out_dir>/<name>.json`` / ``.md``."""
    torch.manual_seed(0)
    results: dict[str, object] = {"device": device, "image_side": image_side, "steps": steps}
    rows = []
    for preset in presets:
        r = bench_preset(preset, device, image_side, steps, repeat)
        results[preset] = r
        print(f"[{preset}] " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()), flush=True)
        rows.append((
            preset, f"{r['encoder_ms']:.1f}", f"{r['decode_b1_ms']:.2f}", f"{r['decode_b16_per_image_ms']:.2f}",
            f"{r['episode_b1_ms']:.1f}", f"{100 * r['episode_over_encoder']:.1f}%",
            f"{100 * r['episode_b16_per_image_over_encoder']:.1f}%",
        ))
    clip = bench_clip(clip_model, device, image_side, repeat)
    results[f"clip_{clip_model}"] = clip
    print(f"[clip {clip_model}] clip_map_ms={clip['clip_map_ms']:.1f}", flush=True)
    rows.append((f"CLIP-Surgery {clip_model} map", f"{clip['clip_map_ms']:.1f}", "", "", "", "", ""))
    path = write_results(
        name or f"perception_{device}", results, rows,
        ("model", "encoder ms/img", "decode b1 ms", "decode b16 ms/img", f"episode T={steps} b1 ms",
         "episode/encoder (b1)", "episode/encoder (b16, per img)"),
        out_dir,
    )
    print(f"wrote {path}")
    return results
