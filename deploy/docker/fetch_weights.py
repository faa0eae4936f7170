#!/usr/bin/env python3
"""Download model weights and verify their SHA-256 before keeping them (the image build runs this).

    fetch_weights.py sam vit_b --out /opt/weights/sam_vit_b.pth [--sha256 HEX] [--url URL]
    fetch_weights.py clip --out /opt/weights/clip_vit_b16_openai.safetensors [--revision REV] [--sha256 HEX]

SAM: Meta's official checkpoints (``dl.fbaipublicfiles.com/segment_anything``), checked against :data:`SAM`'s
SHA-256 values. Meta's segment-anything README publishes the URLs, not checksums; these values are the ones
independent downloaders (e.g. micro-sam's model registry) verify the same files with. ``--sha256`` overrides one.

CLIP: OpenAI's ViT-B/16 in open_clip's own format, the very file ``open_clip.create_model("ViT-B-16",
pretrained="openai")`` downloads (``timm/vit_base_patch16_clip_224.openai``, ``open_clip_model.safetensors``; the
original OpenAI URL that embeds its checksum no longer serves). No checksum for it is published outside the Hugging
Face hub, so without ``--sha256`` the file is checked against the SHA-256 the hub records for that revision (its
LFS object id, from the hub's API), and the value is printed: pass it back as ``--sha256`` (the Dockerfile's
``CLIP_SHA256``), with a pinned ``--revision``, to fix it for later builds.

A download is written to ``OUT.part`` and renamed only after its checksum matched; on a mismatch nothing is kept
and the exit status is 1, with one line saying what was expected and what arrived. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple


class Weights(NamedTuple):
    url: str
    sha256: str


SAM_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
SAM: dict[str, Weights] = {
    "vit_b": Weights(f"{SAM_BASE}/sam_vit_b_01ec64.pth",
                     "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": Weights(f"{SAM_BASE}/sam_vit_l_0b3195.pth",
                     "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": Weights(f"{SAM_BASE}/sam_vit_h_4b8939.pth",
                     "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
}
"""SAM preset -> official checkpoint URL and its SHA-256."""

CLIP_REPO = "timm/vit_base_patch16_clip_224.openai"
CLIP_FILE = "open_clip_model.safetensors"
CHUNK = 1 << 20
USER_AGENT = "alignsam-fetch-weights/1"


class FetchError(Exception):
    """A download failed or did not match its checksum."""


def hub_endpoint() -> str:
    """The Hugging Face hub (``HF_ENDPOINT`` as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _open(url: str, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except OSError as exc:
        raise FetchError(f"cannot download {url}: {exc}") from exc


def hub_sha256(repo: str, revision: str, filename: str, timeout: float = 60.0) -> str:
    """The SHA-256 the hub records for ``filename`` at ``revision`` (its LFS object id)."""
    quoted = urllib.parse.quote(revision, safe="")
    url = f"{hub_endpoint()}/api/models/{repo}/tree/{quoted}"
    with _open(url, timeout) as response:
        entries = json.load(response)
    for entry in entries:
        if entry.get("path") == filename:
            oid = (entry.get("lfs") or {}).get("oid", "")
            if len(oid) == 64:
                return str(oid)
            raise FetchError(f"the hub lists {repo}/{filename}@{revision} without an LFS SHA-256; pass --sha256")
    raise FetchError(f"{filename} not found in {repo} at revision {revision!r}")


def download(url: str, out: Path, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``out`` if its SHA-256 is ``sha256`` (an existing matching ``out`` is kept)."""
    expected = sha256.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise FetchError(f"not a SHA-256 hex digest: {sha256!r}")
    if out.is_file() and file_sha256(out) == expected:
        print(f"{out}: present, sha256 {expected} ok", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with _open(url, timeout) as response, part.open("wb") as sink:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                sink.write(chunk)
                size += len(chunk)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise FetchError(f"download of {url} broke off after {size} bytes: {exc}") from exc
    got = digest.hexdigest()
    if got != expected:
        part.unlink(missing_ok=True)
        raise FetchError(f"{url}: sha256 {got} ({size} bytes) does not match the expected {expected}; "
                         "nothing was kept")
    part.replace(out)
    print(f"{out}: {size} bytes from {url}, sha256 {got} ok", flush=True)
    return out


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fetch_weights.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sam = sub.add_parser("sam", help="an official SAM checkpoint")
    sam.add_argument("preset", choices=sorted(SAM))
    sam.add_argument("--url", default="", help="another source of the same file (default: Meta's)")
    clip = sub.add_parser("clip", help="OpenAI CLIP ViT-B/16 in open_clip's format")
    clip.add_argument("--revision", default="main", help="hub revision (a commit id pins it)")
    for p in (sam, clip):
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--sha256", default="", help="expected SHA-256 (overrides the built-in or the hub's)")
    args = parser.parse_args(argv)
    try:
        if args.what == "sam":
            known = SAM[args.preset]
            download(args.url or known.url, args.out, args.sha256 or known.sha256)
        else:
            quoted = urllib.parse.quote(args.revision, safe="")
            url = f"{hub_endpoint()}/{CLIP_REPO}/resolve/{quoted}/{CLIP_FILE}"
            sha256 = args.sha256
            if not sha256:
                sha256 = hub_sha256(CLIP_REPO, args.revision, CLIP_FILE)
                print(f"CLIP: no --sha256 given; verifying against the hub's record {sha256} "
                      f"(pin it: --build-arg CLIP_SHA256={sha256})", flush=True)
            download(url, args.out, sha256)
    except FetchError as exc:
        print(f"fetch_weights: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
