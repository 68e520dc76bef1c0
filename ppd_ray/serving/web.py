"""The web page the ingress serves at `/`: its files (ppd_ray/serving/web/, no build step, nothing from the internet) and the
example pairs it starts from (a prepared split, read by `ppd.data.example_pairs`).

The page is plain HTML/CSS/JS that calls the same /v1 API as any client; its Content-Security-Policy allows
nothing but this server, so a page that tried to load a script, style, font or image from elsewhere would break
visibly (and the browser test would see it).
"""

from __future__ import annotations

import base64
import threading
from pathlib import Path

from fastapi import Response

from ppd.config import PPDConfig
from ppd.data.example_pairs import ExamplePairSource, ExamplesMissing, ImageBudget
from ppd_ray.serving.schemas import ExamplePairOut, ExamplePairsResponse

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    # data: images are the API's base64 PNGs; blob: are a person's uploads before they are read.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is small and changes with the code: never let a browser keep an old app.js beside a new API.
    "Cache-Control": "no-cache",
}
# Room for the JSON around a group's images (captions, keys) inside the body limit.
BODY_OVERHEAD_BYTES = 16 * 2**10


class WebPage:
    """The page's files, read once per ingress replica."""

    def __init__(self) -> None:
        self.files = {name: (WEB_DIR / name).read_bytes() for name in ASSETS}

    def response(self, name: str) -> Response:
        return Response(content=self.files[name], media_type=ASSETS[name], headers=SECURITY_HEADERS)


def example_budget(cfg: PPDConfig) -> ImageBudget:
    """Per-image bytes and pixels such that N example pairs, base64 in one POST /v1/users body, pass the limits."""
    limits = cfg.serve.limits
    body_share = (limits.max_body_bytes - BODY_OVERHEAD_BYTES) * 3 // 4 // (2 * cfg.data.shots)  # base64: 4/3
    return ImageBudget(max_bytes=max(256, min(limits.max_image_bytes, body_share)), max_pixels=limits.max_image_pixels)


class ExamplePairs:
    """The configured split, opened on first use (and retried until it exists: `ppd demo` may still be running)."""

    def __init__(self, cfg: PPDConfig) -> None:
        self.directory = Path(cfg.serve.example_pairs_dir).expanduser().resolve()
        self.budget = example_budget(cfg)
        self._source: ExamplePairSource | None = None
        self._lock = threading.Lock()

    def source(self) -> ExamplePairSource:
        """The opened split, or ExamplesMissing with what to do."""
        with self._lock:
            if self._source is None:
                try:
                    self._source = ExamplePairSource(self.directory)
                except ExamplesMissing:
                    raise ExamplesMissing(
                        f"no example pairs at {self.directory}: run `make demo` (it writes "
                        "runs/demo/prepared/population/validation) or set serve.example_pairs_dir to a prepared "
                        "split; meanwhile upload your own pairs"
                    ) from None
            return self._source

    def sample(self, count: int, seed: int) -> ExamplePairsResponse:
        source = self.source()
        pairs = [
            ExamplePairOut(
                caption=pair.caption,
                image_0=_data_uri(pair.image_0.data, pair.image_0.media_type),
                image_1=_data_uri(pair.image_1.data, pair.image_1.media_type),
                source=pair.source,
            )
            for pair in source.sample(count, seed, self.budget)
        ]
        return ExamplePairsResponse(pairs=pairs, split=self.directory.name, available=len(source.rows))


def _data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"
