"""Example pairs for the web page: sampling a prepared split, and images made to fit the API's limits."""

from __future__ import annotations

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ppd.config import load_config
from ppd.data.example_pairs import ExamplePairSource, ExamplesMissing, ImageBudget, fit_image
from ppd_ray.serving.web import BODY_OVERHEAD_BYTES, example_budget

BUDGET = ImageBudget(max_bytes=20_000, max_pixels=64 * 64)


def _image(size: int, kind: str = "PNG", noise: bool = False) -> bytes:
    image = Image.new("RGB", (size, size), (200, 40, 90))
    if noise:  # noise does not compress: a large file
        rng = random.Random(size)
        image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size * size)])
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


@pytest.fixture
def split(tmp_path):
    """Two files, the first in row groups of 2: 7 rows, 5 distinct captions, one undecodable image."""
    captions = ["a red ring", "a red ring", "a blue square", "a green cross", "a red ring"]
    first = {
        "caption": captions,
        "jpg_0": [_image(16), _image(16), b"not an image", _image(16), _image(16)],
        "jpg_1": [_image(16), _image(200, "JPEG", noise=True), _image(16), _image(16), _image(16)],
        "label_0": [1.0, 0.0, 1.0, 0.0, 1.0],
    }
    pq.write_table(pa.table(first), tmp_path / "part-0.parquet", row_group_size=2)
    second = {
        "caption": ["a pink circle", "a teal ring"],
        "jpg_0": [_image(16), _image(16)],
        "jpg_1": [_image(16), _image(16)],
        "label_0": [1.0, 0.0],
    }
    pq.write_table(pa.table(second), tmp_path / "part-1.parquet")
    return tmp_path


def test_a_sample_has_distinct_captions_first_and_is_reproducible(split):
    source = ExamplePairSource(split)
    assert len(source.rows) == 7
    pairs = source.sample(4, seed=3, budget=BUDGET)
    assert len({pair.caption for pair in pairs}) == 4
    assert [p.source for p in pairs] == [p.source for p in source.sample(4, seed=3, budget=BUDGET)]
    others = {tuple(p.source for p in source.sample(4, seed=s, budget=BUDGET)) for s in range(10)}
    assert len(others) > 1  # another seed, other pairs


def test_asking_for_more_than_the_split_skips_only_the_undecodable_pair(split):
    pairs = ExamplePairSource(split).sample(50, seed=0, budget=BUDGET)
    assert len(pairs) == 6  # 7 rows, one with an undecodable image
    assert "part-0.parquet:1:0" not in {pair.source for pair in pairs}  # that row: file 0, row group 1, row 0


def test_images_within_the_budget_are_returned_as_stored(split):
    stored = _image(16)
    fitted = fit_image(stored, BUDGET)
    assert fitted.data == stored and fitted.media_type == "image/png"


def test_a_large_image_is_scaled_down_to_the_budget():
    large = _image(200, "JPEG", noise=True)
    assert len(large) > BUDGET.max_bytes
    fitted = fit_image(large, BUDGET)
    assert len(fitted.data) <= BUDGET.max_bytes and fitted.media_type == "image/jpeg"
    with Image.open(io.BytesIO(fitted.data)) as image:
        assert image.width * image.height <= BUDGET.max_pixels
    assert fit_image(b"garbage", BUDGET) is None


def test_a_missing_or_empty_split_says_where_it_looked(tmp_path):
    with pytest.raises(ExamplesMissing, match="no preference pairs under"):
        ExamplePairSource(tmp_path / "nowhere")
    with pytest.raises(ExamplesMissing):
        ExamplePairSource(tmp_path)


@pytest.mark.parametrize("preset", ["tiny_cpu", "serve_lite_h100"])
def test_a_group_of_example_images_fits_one_request_body(preset):
    cfg = load_config(preset)
    budget = example_budget(cfg)
    limits = cfg.serve.limits
    assert budget.max_bytes <= limits.max_image_bytes and budget.max_pixels == limits.max_image_pixels
    base64_chars = -(-budget.max_bytes // 3) * 4
    assert 2 * cfg.data.shots * base64_chars + BODY_OVERHEAD_BYTES <= limits.max_body_bytes
