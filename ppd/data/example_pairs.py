"""Example preference pairs drawn from a prepared split, for people trying the served model (the web page).

A prepared split (`ppd prepare` output, Pick-a-Pic v2 schema) can be large: the real validation split holds ~20k
pairs of 512-1024 px JPEGs. So only the captions are read up front (one small column); a sample reads just the row
groups of the rows it picked, and only their two image columns. Images that do not fit the API's limits are scaled
down and re-encoded, so every example can be posted straight back to POST /v1/users.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}
JPEG_QUALITY = 90


class ExamplesMissing(FileNotFoundError):
    """The configured split has no parquet files (e.g. `ppd demo` has not run yet)."""


@dataclass(frozen=True)
class ImageBudget:
    """What one example image may weigh so that a whole few-shot group still passes the API's limits."""

    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class ExampleImage:
    data: bytes  # PNG or JPEG file bytes
    media_type: str  # image/png or image/jpeg


@dataclass(frozen=True)
class ExamplePair:
    caption: str
    image_0: ExampleImage
    image_1: ExampleImage
    source: str  # "<file>:<row>" of the split, so a pair can be traced back


@dataclass(frozen=True)
class _Row:
    file: int
    row_group: int
    row_in_group: int
    caption: str


class ExamplePairSource:
    """The rows of one prepared split; `sample(count, seed, budget)` returns pairs with distinct captions first."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.files = sorted(self.directory.glob("*.parquet")) if self.directory.is_dir() else []
        rows: list[_Row] = []
        for file_index, path in enumerate(self.files):
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                captions = parquet.read_row_group(group, columns=["caption"]).column("caption").to_pylist()
                rows.extend(_Row(file_index, group, i, str(c)) for i, c in enumerate(captions) if c)
        if not rows:
            raise ExamplesMissing(f"no preference pairs under {self.directory.resolve()}")
        self.rows = rows

    def sample(self, count: int, seed: int, budget: ImageBudget) -> list[ExamplePair]:
        """`count` pairs (fewer only if the split is smaller); the same seed gives the same pairs."""
        order = list(range(len(self.rows)))
        random.Random(seed).shuffle(order)
        # Distinct captions first: four pairs on one caption tell the embedder less than four captions do.
        seen: set[str] = set()
        first, rest = [], []
        for index in order:
            caption = self.rows[index].caption
            (rest if caption in seen else first).append(index)
            seen.add(caption)
        pairs: list[ExamplePair] = []
        candidates = first + rest
        while len(pairs) < count and candidates:
            chunk, candidates = candidates[: count - len(pairs)], candidates[count - len(pairs) :]
            pairs.extend(pair for pair in self._read(chunk, budget) if pair is not None)
        return pairs

    def _read(self, indices: list[int], budget: ImageBudget) -> list[ExamplePair | None]:
        by_group: dict[tuple[int, int], list[int]] = {}
        for index in indices:
            row = self.rows[index]
            by_group.setdefault((row.file, row.row_group), []).append(index)
        read: dict[int, ExamplePair | None] = {}
        for (file_index, group), members in by_group.items():
            table = pq.ParquetFile(self.files[file_index]).read_row_group(group, columns=["jpg_0", "jpg_1"])
            for index in members:
                row = self.rows[index]
                images = [table.column(name)[row.row_in_group].as_py() for name in ("jpg_0", "jpg_1")]
                fitted = [fit_image(data, budget) if data else None for data in images]
                source = f"{self.files[file_index].name}:{group}:{row.row_in_group}"
                # The prepare job rejects undecodable images, but a split can be edited by hand: skip, never fail.
                ok = all(image is not None for image in fitted)
                read[index] = ExamplePair(row.caption, fitted[0], fitted[1], source) if ok else None
        return [read[index] for index in indices]


def fit_image(data: bytes, budget: ImageBudget) -> ExampleImage | None:
    """The image as stored when it is a PNG/JPEG within the budget, else scaled down to fit; None if undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            kind = image.format
            width, height = image.size
            if kind in MEDIA_TYPES and len(data) <= budget.max_bytes and width * height <= budget.max_pixels:
                return ExampleImage(data, MEDIA_TYPES[kind])  # untouched: the embedder sees the split's bytes
            rgb = image.convert("RGB")
    except Exception:  # PIL raises many types for corrupt data
        return None
    scale = min(1.0, math.sqrt(budget.max_pixels / (width * height)))
    while True:
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        buffer = io.BytesIO()
        rgb.resize(size, Image.Resampling.LANCZOS).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        if buffer.tell() <= budget.max_bytes or size == (1, 1):
            return ExampleImage(buffer.getvalue(), "image/jpeg")
        scale *= 0.75
