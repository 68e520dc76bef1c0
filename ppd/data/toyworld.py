"""The toy world: procedural images, captions from a small grammar, and synthetic users with hidden rewards.

Every attribute a user may care about is *measured from pixels* (`measure_attributes`), so the same reward scores
training images and, later, generated images. Users label pairs by Bradley-Terry sampling on their hidden reward.
Output is written in the Pick-a-Pic v2 schema (pairs/) so the real readers and jobs run on it unchanged; the rewards
go to hidden/ and only evaluation may read them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ppd.config import ATTRIBUTES, ToyWorldConfig
from ppd.data.images import png_bytes
from ppd.data.schema import PICKAPIC_V2_SCHEMA

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring", "cross")
COLOUR_HUES: dict[str, float] = {  # hue in degrees of the object colour a caption names
    "red": 0.0,
    "orange": 30.0,
    "yellow": 55.0,
    "green": 120.0,
    "teal": 175.0,
    "blue": 220.0,
    "purple": 275.0,
    "pink": 320.0,
}
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {colour} {shape} shape",
    "an image showing a {colour} {shape}",
)
POPULATIONS: tuple[str, ...] = ("one_reward", "population")
RENDERER = "toy-renderer-v1"
# Render at a finer grid and average down: anti-aliased edges make size and position continuous.
_SUPERSAMPLED_SIDE = 64
_REFERENCE_IMAGES = 4096  # images rendered to standardise attributes (mean/std)


def caption_grammar() -> list[str]:
    """All captions of the grammar (template x colour x shape), in a fixed order."""
    return [t.format(colour=c, shape=s) for t in TEMPLATES for c in COLOUR_HUES for s in SHAPES]


def parse_caption(caption: str) -> tuple[str, str]:
    """(colour, shape) named by a grammar caption."""
    words = caption.split()
    colour = next(w for w in words if w in COLOUR_HUES)
    shape = next(w for w in words if w in SHAPES)
    return colour, shape


# --- rendering ----------------------------------------------------------------------------------------------------


def _hsv_to_rgb(hue_deg: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1]; inputs [B], output [B, 3]."""
    h = (hue_deg % 360.0) / 60.0
    c = val * sat
    x = c * (1 - np.abs(h % 2 - 1))
    zeros = np.zeros_like(h)
    sector = np.floor(h).astype(int) % 6
    table = np.stack(
        [
            np.stack([c, x, zeros], -1),
            np.stack([x, c, zeros], -1),
            np.stack([zeros, c, x], -1),
            np.stack([zeros, x, c], -1),
            np.stack([x, zeros, c], -1),
            np.stack([c, zeros, x], -1),
        ],
        0,
    )  # [6, B, 3]
    rgb = table[sector, np.arange(len(h))]
    return rgb + (val - c)[:, None]


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` centred at 0 with radius r; dx, dy, r broadcast to [B, H, W]."""
    dist = np.sqrt(dx**2 + dy**2)
    if shape == "circle":
        return dist <= r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * r
    if shape == "triangle":  # pointing up
        top = -r
        return (dy >= top) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.65 * (dy - top))
    if shape == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    if shape == "cross":
        arm = 0.35 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class SceneParams:
    """Free parameters of a batch of scenes (everything the caption does not fix); arrays of shape [B]."""

    bg_hue: np.ndarray
    bg_sat: np.ndarray
    bg_val: np.ndarray
    fg_hue_jitter: np.ndarray
    fg_sat: np.ndarray
    fg_val: np.ndarray
    offset_radius: np.ndarray  # distance of the object from the centre, in image sides
    offset_angle: np.ndarray
    size: np.ndarray  # object radius, in image sides


def sample_scene_params(rng: np.random.Generator, n: int) -> SceneParams:
    """Draw n independent scenes' free parameters."""
    return SceneParams(
        bg_hue=rng.uniform(0, 360, n),
        bg_sat=rng.uniform(0.0, 0.8, n),
        bg_val=rng.uniform(0.1, 0.95, n),
        fg_hue_jitter=rng.normal(0, 8, n),
        fg_sat=rng.uniform(0.35, 1.0, n),
        fg_val=rng.uniform(0.35, 1.0, n),
        offset_radius=rng.uniform(0.0, 0.3, n),
        offset_angle=rng.uniform(0, 2 * np.pi, n),
        size=rng.uniform(0.12, 0.36, n),
    )


def supersample(image_size: int) -> int:
    """Sub-pixels per pixel side when rendering at `image_size` (4 at 16 px, 2 at 32 px: a 64-wide fine grid)."""
    return max(1, _SUPERSAMPLED_SIDE // image_size)


def render(captions: list[str], params: SceneParams, image_size: int) -> np.ndarray:
    """Render one image per caption: uint8 [B, S, S, 3]."""
    ss = supersample(image_size)
    n, side = len(captions), image_size * ss
    coords = (np.arange(side) + 0.5) / side  # pixel centres in [0, 1]
    ys, xs = np.meshgrid(coords, coords, indexing="ij")  # [side, side]
    cx = 0.5 + params.offset_radius * np.cos(params.offset_angle)
    cy = 0.5 + params.offset_radius * np.sin(params.offset_angle)
    dx = xs[None] - cx[:, None, None]  # [B, side, side]
    dy = ys[None] - cy[:, None, None]
    r = params.size[:, None, None]
    colours, shapes = zip(*(parse_caption(c) for c in captions), strict=True)
    mask = np.zeros((n, side, side), dtype=bool)
    for shape in set(shapes):
        rows = np.array([s == shape for s in shapes])
        mask[rows] = shape_mask(shape, dx[rows], dy[rows], r[rows])
    fg_hue = np.array([COLOUR_HUES[c] for c in colours]) + params.fg_hue_jitter
    fg = _hsv_to_rgb(fg_hue, params.fg_sat, params.fg_val)  # [B, 3]
    bg = _hsv_to_rgb(params.bg_hue, params.bg_sat, params.bg_val)  # [B, 3]
    image = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])  # [B, side, side, 3]
    image = image.reshape(n, image_size, ss, image_size, ss, 3).mean(axis=(2, 4))
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


# --- attributes measured from pixels --------------------------------------------------------------------------------


def measure_attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """Raw attribute values of uint8 images [B, H, W, 3] (also of generated ones): name -> [B] float64."""
    rgb = images.astype(np.float64) / 255.0
    b, h, w, _ = rgb.shape
    r_, g_, b_ = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cmax, cmin = rgb.max(-1), rgb.min(-1)
    brightness = (0.299 * r_ + 0.587 * g_ + 0.114 * b_).mean(axis=(1, 2))
    saturation = np.where(cmax > 1e-6, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0).mean(axis=(1, 2))
    warmth = (r_ - b_).mean(axis=(1, 2))
    # Foreground = pixels far from the background colour, estimated as the median border pixel.
    border = np.concatenate([rgb[:, 0], rgb[:, -1], rgb[:, :, 0], rgb[:, :, -1]], axis=1)  # [B, 2H+2W, 3]
    background = np.median(border, axis=1)  # [B, 3]
    distance = np.abs(rgb - background[:, None, None, :]).max(-1)  # [B, H, W]
    weight = np.clip((distance - 0.06) / 0.12, 0.0, 1.0)  # soft mask: continuous in colour contrast
    size = weight.mean(axis=(1, 2))
    mass = weight.sum(axis=(1, 2))
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    safe = np.maximum(mass, 1e-9)
    cy = (weight * ys).sum(axis=(1, 2)) / safe
    cx = (weight * xs).sum(axis=(1, 2)) / safe
    off_centre = np.sqrt((cx - 0.5) ** 2 + (cy - 0.5) ** 2) / np.sqrt(0.5)
    # No visible object: nothing is centred.
    centredness = np.where(mass > 0.5, 1.0 - off_centre, 0.0)
    return {
        "brightness": brightness,
        "saturation": saturation,
        "centredness": centredness,
        "warmth": warmth,
        "size": size,
    }


@dataclass(frozen=True)
class AttributeScale:
    """Mean and std of each attribute over reference images: rewards use standardised attributes."""

    mean: dict[str, float]
    std: dict[str, float]

    def standardise(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """Raw attributes -> z-scores [B, A] in `ATTRIBUTES` order."""
        return np.stack([(raw[a] - self.mean[a]) / self.std[a] for a in ATTRIBUTES], axis=-1)


def reference_scale(image_size: int, seed: int) -> AttributeScale:
    """Attribute statistics of `_REFERENCE_IMAGES` toy images (deterministic)."""
    rng = np.random.default_rng([seed, 7])
    grammar = caption_grammar()
    captions = [grammar[i] for i in rng.integers(0, len(grammar), _REFERENCE_IMAGES)]
    raw = measure_attributes(render(captions, sample_scene_params(rng, _REFERENCE_IMAGES), image_size))
    return AttributeScale(
        mean={a: float(raw[a].mean()) for a in ATTRIBUTES}, std={a: float(raw[a].std()) + 1e-9 for a in ATTRIBUTES}
    )


# --- users ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticUser:
    """A user with a hidden linear reward over standardised attributes."""

    user_id: int
    population: str
    weights: np.ndarray  # [A], in ATTRIBUTES order

    def reward(self, z: np.ndarray) -> np.ndarray:
        """Reward of images given standardised attributes z [B, A] -> [B]."""
        return z @ self.weights


def make_users(cfg: ToyWorldConfig, seed: int) -> list[SyntheticUser]:
    """One one-reward user per attribute, then `population_users` users with random unit-norm reward directions."""
    rng = np.random.default_rng([seed, 11])
    users = [
        SyntheticUser(user_id=100 + k, population="one_reward", weights=np.eye(len(ATTRIBUTES))[k])
        for k in range(len(ATTRIBUTES))
    ]
    for i in range(cfg.population_users):
        direction = rng.normal(size=len(ATTRIBUTES))
        users.append(
            SyntheticUser(user_id=10_000 + i, population="population", weights=direction / np.linalg.norm(direction))
        )
    return users


# --- pair generation ------------------------------------------------------------------------------------------------


def _uid(rng: np.random.Generator) -> str:
    h = rng.bytes(16).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_EPOCH = datetime(2023, 6, 1)


def _user_pairs(
    user: SyntheticUser, n_pairs: int, cfg: ToyWorldConfig, scale: AttributeScale, seed: int, first_ranking_id: int
) -> dict[str, list]:
    """Pick-a-Pic v2 columns for `n_pairs` pairs labelled by `user` (deterministic per user and seed)."""
    rng = np.random.default_rng([seed, user.user_id])
    grammar = caption_grammar()
    captions = [grammar[i] for i in rng.integers(0, len(grammar), n_pairs)]
    images_0 = render(captions, sample_scene_params(rng, n_pairs), cfg.image_size)
    images_1 = render(captions, sample_scene_params(rng, n_pairs), cfg.image_size)
    identical = rng.random(n_pairs) < cfg.identical_pair_rate
    images_1[identical] = images_0[identical]
    reward_0 = user.reward(scale.standardise(measure_attributes(images_0)))
    reward_1 = user.reward(scale.standardise(measure_attributes(images_1)))
    margin = reward_0 - reward_1
    prefers_0 = rng.random(n_pairs) < 1.0 / (1.0 + np.exp(-cfg.bt_temperature * margin))  # Bradley-Terry
    tie = (np.abs(margin) < cfg.tie_margin) | identical
    label_0 = np.where(tie, 0.5, prefers_0.astype(np.float64))
    uids_0 = [_uid(rng) for _ in range(n_pairs)]
    uids_1 = [u if same else _uid(rng) for u, same in zip(uids_0, identical, strict=True)]
    best = ["" if t else (u0 if p else u1) for t, p, u0, u1 in zip(tie, prefers_0, uids_0, uids_1, strict=True)]
    return {
        "caption": captions,
        "jpg_0": [png_bytes(im) for im in images_0],
        "jpg_1": [png_bytes(im) for im in images_1],
        "label_0": label_0.tolist(),
        "label_1": (1.0 - label_0).tolist(),
        "user_id": [user.user_id] * n_pairs,
        "ranking_id": list(range(first_ranking_id, first_ranking_id + n_pairs)),
        "image_0_uid": uids_0,
        "image_1_uid": uids_1,
        "best_image_uid": best,
        "has_label": [True] * n_pairs,
        "are_different": (~identical).tolist(),
        "model_0": [RENDERER] * n_pairs,
        "model_1": [RENDERER] * n_pairs,
        "created_at": [_EPOCH + timedelta(seconds=first_ranking_id + i) for i in range(n_pairs)],
        "num_example_per_prompt": [1] * n_pairs,
    }


def _pairs_per_user(user: SyntheticUser, cfg: ToyWorldConfig) -> int:
    return cfg.one_reward_pairs_per_user if user.population == "one_reward" else cfg.population_pairs_per_user


def iter_population_tables(
    users: list[SyntheticUser], cfg: ToyWorldConfig, scale: AttributeScale, seed: int
) -> Iterator[tuple[str, pa.Table]]:
    """Yield (population, table) chunks of about `rows_per_file` rows, users never split across chunks."""
    ranking_id = 1
    for population in POPULATIONS:
        buffer: list[pa.Table] = []
        buffered = 0
        for user in (u for u in users if u.population == population):
            n = _pairs_per_user(user, cfg)
            buffer.append(pa.table(_user_pairs(user, n, cfg, scale, seed, ranking_id), schema=PICKAPIC_V2_SCHEMA))
            ranking_id += n
            buffered += n
            if buffered >= cfg.rows_per_file:
                yield population, pa.concat_tables(buffer)
                buffer, buffered = [], 0
        if buffer:
            yield population, pa.concat_tables(buffer)


def write_toy_world(out: Path, cfg: ToyWorldConfig, seed: int, progress=None) -> dict:
    """Write pairs/<population>/part-*.parquet, hidden/rewards.json and manifest.json under `out`; return the manifest."""
    out = Path(out)
    users = make_users(cfg, seed)
    scale = reference_scale(cfg.image_size, seed)
    counts: dict[str, dict[str, int]] = {p: {"users": 0, "pairs": 0, "files": 0} for p in POPULATIONS}
    for population in POPULATIONS:
        (out / "pairs" / population).mkdir(parents=True, exist_ok=True)
        for stale in (out / "pairs" / population).glob("part-*.parquet"):
            stale.unlink()  # a re-run with other sizes must not leave old shards behind
    for population, table in iter_population_tables(users, cfg, scale, seed):
        part = counts[population]["files"]
        pq.write_table(table, out / "pairs" / population / f"part-{part:05d}.parquet")
        counts[population]["files"] += 1
        counts[population]["pairs"] += table.num_rows
        if progress is not None:
            progress(population, table.num_rows)
    for user in users:
        counts[user.population]["users"] += 1
    hidden = {
        "warning": "hidden ground truth of the toy world: only evaluation may read this file",
        "attributes": list(ATTRIBUTES),
        "attribute_scale": {"mean": scale.mean, "std": scale.std},
        "bt_temperature": cfg.bt_temperature,
        "users": {
            str(u.user_id): {"population": u.population, "weights": [float(w) for w in u.weights]} for u in users
        },
    }
    (out / "hidden").mkdir(parents=True, exist_ok=True)
    (out / "hidden" / "rewards.json").write_text(json.dumps(hidden, indent=1))
    manifest = {
        "seed": seed,
        "config": cfg.model_dump(),
        "populations": counts,
        "one_reward_users": {ATTRIBUTES[k]: 100 + k for k in range(len(ATTRIBUTES))},
        "captions": len(caption_grammar()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


@dataclass(frozen=True)
class HiddenRewards:
    """The toy world's ground truth, for evaluation only."""

    scale: AttributeScale
    weights: dict[int, np.ndarray]  # user_id -> [A]
    population: dict[int, str]

    def reward(self, user_id: int, images: np.ndarray) -> np.ndarray:
        """The hidden reward of `user_id` for uint8 images [B, H, W, 3] -> [B]."""
        return self.scale.standardise(measure_attributes(images)) @ self.weights[user_id]


def load_hidden_rewards(world_dir: Path) -> HiddenRewards:
    """Read hidden/rewards.json (evaluation only: embedders and trainers never call this)."""
    raw = json.loads((Path(world_dir) / "hidden" / "rewards.json").read_text())
    scale = AttributeScale(mean=raw["attribute_scale"]["mean"], std=raw["attribute_scale"]["std"])
    return HiddenRewards(
        scale=scale,
        weights={int(k): np.asarray(v["weights"]) for k, v in raw["users"].items()},
        population={int(k): v["population"] for k, v in raw["users"].items()},
    )
