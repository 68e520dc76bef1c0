"""The Pick-a-Pic v2 parquet schema, and checks of a file's schema against it."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# The columns every reader relies on, with the real dataset's types. Real shards carry more (image URLs): kept as is.
PICKAPIC_V2_SCHEMA = pa.schema(
    [
        ("caption", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("user_id", pa.int64()),
        ("ranking_id", pa.int64()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("best_image_uid", pa.string()),
        ("has_label", pa.bool_()),
        ("are_different", pa.bool_()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("created_at", pa.timestamp("us")),
        ("num_example_per_prompt", pa.int64()),
    ]
)
REQUIRED_COLUMNS: tuple[str, ...] = tuple(PICKAPIC_V2_SCHEMA.names)


def _kind(dtype: pa.DataType) -> str:
    """Coarse type family: a file may use another width or unit of the same family (int32 for int64, ns for us)."""
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return "binary"
    if pa.types.is_timestamp(dtype):
        return "timestamp"
    return str(dtype)


# Where a file's type may be safely widened to the schema's (labels written as ints are still labels).
_COMPATIBLE = {("integer", "float"), ("integer", "integer"), ("float", "float")}


@dataclass(frozen=True)
class SchemaProblem:
    """Why a file cannot be read as Pick-a-Pic v2: the rejection reason and a message naming the column."""

    reason: str  # "missing_column" | "wrong_type"
    message: str


def check_schema(schema: pa.Schema) -> SchemaProblem | None:
    """Return the first problem of `schema` against Pick-a-Pic v2, or None when every required column fits."""
    missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        return SchemaProblem("missing_column", f"missing column(s): {', '.join(missing)}")
    for field in PICKAPIC_V2_SCHEMA:
        got = schema.field(field.name).type
        want_kind, got_kind = _kind(field.type), _kind(got)
        if got_kind != want_kind and (got_kind, want_kind) not in _COMPATIBLE:
            return SchemaProblem("wrong_type", f"column {field.name!r} has type {got}, expected {field.type}")
    return None


def conform(table: pa.Table) -> pa.Table:
    """Cast the required columns of a schema-checked table to the canonical types; other columns are kept."""
    columns = []
    for name in table.column_names:
        column = table.column(name)
        if name in REQUIRED_COLUMNS:
            column = column.cast(PICKAPIC_V2_SCHEMA.field(name).type)
        columns.append(column)
    return pa.table(columns, names=table.column_names)
