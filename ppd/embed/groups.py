"""Few-shot groups as the embedders see them: rows of PREP/groups decoded into captions, images and choices."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

# Columns of PREP/groups that an embedder reads (written by the preparation job).
GROUP_COLUMNS = ("group_id", "user_id", "pair_ids", "captions", "jpg_0", "jpg_1", "preferred")


class UndecodableGroup(ValueError):
    """A group whose images cannot be decoded: it becomes an error row, not a crashed job."""


@dataclass(frozen=True)
class FewShotGroup:
    """N preference pairs of one user: for pair i, the user preferred `jpg_1[i]` if `preferred[i]` else `jpg_0[i]`."""

    group_id: int
    user_id: int
    pair_ids: tuple[int, ...]
    captions: tuple[str, ...]
    jpg_0: tuple[bytes, ...]
    jpg_1: tuple[bytes, ...]
    preferred: tuple[int, ...]

    def images(self) -> list[Image.Image]:
        """RGB images in prompt order: jpg_0, jpg_1 of pair 1, then pair 2, ...; raises UndecodableGroup."""
        return [decode_image(data, self.group_id, i // 2) for i, data in enumerate(_interleave(self.jpg_0, self.jpg_1))]

    def chosen_and_rejected(self) -> tuple[list[Image.Image], list[Image.Image]]:
        """(x+, x-) images per pair, in pair order; raises UndecodableGroup."""
        images = self.images()
        chosen = [images[2 * i + choice] for i, choice in enumerate(self.preferred)]
        rejected = [images[2 * i + 1 - choice] for i, choice in enumerate(self.preferred)]
        return chosen, rejected


def decode_image(data: bytes | None, group_id: int, pair_index: int) -> Image.Image:
    """PNG/JPEG bytes -> RGB PIL image, or UndecodableGroup naming the group and pair."""
    try:
        with Image.open(io.BytesIO(data or b"")) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, ...
        raise UndecodableGroup(f"group {group_id}, pair {pair_index + 1}: undecodable image ({err})") from None


def groups_from_rows(rows: Iterable[Mapping]) -> list[FewShotGroup]:
    """Rows with the GROUP_COLUMNS (dicts, e.g. `pyarrow.Table.to_pylist()`) -> FewShotGroup objects."""
    groups = []
    for row in rows:
        n = len(row["captions"])
        lengths = {len(row[c]) for c in ("pair_ids", "jpg_0", "jpg_1", "preferred")}
        if lengths != {n}:
            raise ValueError(f"group {row['group_id']}: list columns of different lengths")
        groups.append(
            FewShotGroup(
                group_id=int(row["group_id"]),
                user_id=int(row["user_id"]),
                pair_ids=tuple(int(p) for p in row["pair_ids"]),
                captions=tuple(str(c) for c in row["captions"]),
                jpg_0=tuple(row["jpg_0"]),
                jpg_1=tuple(row["jpg_1"]),
                preferred=tuple(int(p) for p in row["preferred"]),
            )
        )
    return groups


def _interleave(first: Sequence[bytes], second: Sequence[bytes]) -> list[bytes]:
    return [data for pair in zip(first, second, strict=True) for data in pair]


def groups_from_pairs(pairs, shots: int = 4, seed: int = 0) -> list[dict]:
    """Pick-a-Pic-schema rows (a pandas DataFrame) -> group rows of `shots` pairs per user, for quick experiments.

    Unlike `ppd prepare` this makes no splits: ties and identical pairs are dropped, each user's pairs are shuffled
    (seeded) and cut into disjoint groups; `pair_ids` are the row positions. Returns dicts with GROUP_COLUMNS.
    """
    usable = pairs[(pairs["label_0"] != pairs["label_1"]) & pairs["are_different"]].copy()
    usable["pair_id"] = usable.index.astype(int)
    rows, group_id = [], 0
    for user_id, user_pairs in usable.groupby("user_id", sort=True):
        user_pairs = user_pairs.sample(frac=1.0, random_state=seed)
        for start in range(0, len(user_pairs) - shots + 1, shots):
            group = user_pairs.iloc[start : start + shots]
            rows.append(
                {
                    "group_id": group_id,
                    "user_id": int(user_id),
                    "pair_ids": [int(p) for p in group["pair_id"]],
                    "captions": list(group["caption"]),
                    "jpg_0": list(group["jpg_0"]),
                    "jpg_1": list(group["jpg_1"]),
                    # 1 = the user preferred jpg_1 (label_1 = 1), as `ppd prepare` writes it
                    "preferred": [int(a < b) for a, b in zip(group["label_0"], group["label_1"], strict=True)],
                }
            )
            group_id += 1
    return rows
