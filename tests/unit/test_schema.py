"""The reader accepts Pick-a-Pic v2 shards unchanged."""

import datetime as dt
import io

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ppd.data.schema import check_schema, conform

# Written out here, independently of ppd.data.schema: the columns and types of the real dataset's parquet files
# (plus the URL columns real shards carry, which the reader must keep).
REAL_COLUMNS = {
    "are_different": pa.bool_(),
    "best_image_uid": pa.string(),
    "caption": pa.string(),
    "created_at": pa.timestamp("ns"),
    "has_label": pa.bool_(),
    "image_0_uid": pa.string(),
    "image_0_url": pa.string(),
    "image_1_uid": pa.string(),
    "image_1_url": pa.string(),
    "jpg_0": pa.binary(),
    "jpg_1": pa.binary(),
    "label_0": pa.float64(),
    "label_1": pa.float64(),
    "model_0": pa.string(),
    "model_1": pa.string(),
    "num_example_per_prompt": pa.int64(),
    "ranking_id": pa.int64(),
    "user_id": pa.int64(),
}


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _real_like_table() -> pa.Table:
    values = {
        "are_different": [True, True],
        "best_image_uid": ["a", "d"],
        "caption": ["a cat", "a dog"],
        "created_at": [dt.datetime(2023, 5, 1, 12), dt.datetime(2023, 5, 2, 13)],
        "has_label": [True, True],
        "image_0_uid": ["a", "c"],
        "image_0_url": ["https://example.invalid/a.jpg", "https://example.invalid/c.jpg"],
        "image_1_uid": ["b", "d"],
        "image_1_url": ["https://example.invalid/b.jpg", "https://example.invalid/d.jpg"],
        "jpg_0": [_jpeg("red"), _jpeg("blue")],
        "jpg_1": [_jpeg("green"), _jpeg("white")],
        "label_0": [1.0, 0.0],
        "label_1": [0.0, 1.0],
        "model_0": ["sdxl", "sd2"],
        "model_1": ["sd2", "sdxl"],
        "num_example_per_prompt": [2, 1],
        "ranking_id": [11, 12],
        "user_id": [7, 8],
    }
    return pa.table({k: pa.array(v, type=REAL_COLUMNS[k]) for k, v in values.items()})


def test_real_schema_file_is_read_unchanged(tmp_path):
    path = tmp_path / "shard.parquet"
    original = _real_like_table()
    pq.write_table(original, path)
    read = pq.read_table(path)
    assert check_schema(read.schema) is None
    conformed = conform(read)
    assert conformed.column_names == original.column_names  # extra columns kept, order kept
    for name in original.column_names:
        if name == "created_at":  # only the timestamp unit is normalised; the instants are the same
            assert conformed[name].cast(pa.timestamp("ns")).equals(original[name])
        else:
            assert conformed[name].equals(original[name]), name


def test_missing_and_wrongly_typed_columns_are_named():
    table = _real_like_table()
    problem = check_schema(table.drop_columns(["label_1"]).schema)
    assert problem.reason == "missing_column" and "label_1" in problem.message
    wrong = table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(["7", "8"]))
    problem = check_schema(wrong.schema)
    assert problem.reason == "wrong_type" and "user_id" in problem.message


def test_integer_labels_are_a_compatible_width():
    table = _real_like_table()
    ints = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array([1, 0], pa.int32()))
    assert check_schema(ints.schema) is None
    assert conform(ints)["label_0"].type == pa.float64()
