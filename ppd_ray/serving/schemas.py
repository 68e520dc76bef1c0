"""The HTTP API's request and response models, and the checks that depend on the configured limits.

Pydantic checks what never changes (types, required fields, 0/1 choices, non-negative numbers, finite floats);
`check_*` functions check what the config bounds (pair count, caption length, steps, images, image bytes and
pixels) and raise `RequestError`, which the ingress turns into a 4xx naming the field. Images travel as base64
bytes (PNG/JPEG/...); URLs are refused, so the server never fetches anything on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ppd.config import ServeLimits

# "u_" + secrets.token_urlsafe(24): 32 url-safe characters = 192 random bits.
HANDLE_PREFIX = "u_"
HANDLE_RANDOM_BYTES = 24
HANDLE_PATTERN = re.compile(r"^u_[A-Za-z0-9_-]{32}$")
_DATA_URI = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


class RequestError(Exception):
    """A client mistake: HTTP `status` (4xx) with a message that names the offending `field`."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


class _Request(BaseModel):
    # An unknown key is a client bug (a misspelt "user_scale" must not silently use the default).
    model_config = ConfigDict(extra="forbid")


class PreferencePair(_Request):
    """One preference pair: for `caption` the user preferred `image_1` if `preferred` is 1, else `image_0`."""

    caption: str = Field(description="the caption both images were generated for")
    image_0: str = Field(description="first image: base64 of PNG/JPEG bytes (URLs are not accepted)")
    image_1: str = Field(description="second image: base64 of PNG/JPEG bytes (URLs are not accepted)")
    preferred: Literal[0, 1] = Field(description="which image the user preferred: 0 or 1")


class CreateUserRequest(_Request):
    """A new user from N preference pairs (N = the embedder's few-shot group size, 4 by default)."""

    pairs: list[PreferencePair] = Field(description="exactly N preference pairs of one user")


class MixEntry(_Request):
    """One user of a weighted mix."""

    user: str = Field(description="a user handle from POST /v1/users")
    weight: float = Field(ge=0, allow_inf_nan=False, description="non-negative; the weights of a mix sum to 1")


class GenerationParams(_Request):
    """Sampler settings shared by /v1/generate and /v1/personalize; None = the server's default."""

    seed: int = Field(0, ge=0, le=2**31 - 1, description="image i of the request uses seed + i")
    steps: int | None = Field(None, ge=1, description="sampler steps (default: the config's eval.inference_steps)")
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False, description="text guidance scale")
    user_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="user scale s (0 = base model)")
    num_images: int = Field(1, ge=1, description="images to generate (seeds seed .. seed + n - 1)")
    response_format: Literal["json", "png"] = Field(
        "json", description="json: base64 PNGs in JSON; png: one image/png body (needs num_images = 1)"
    )


class GenerateRequest(GenerationParams):
    """A caption for a stored user, a weighted mix of stored users (interpolation), or no user (the base model)."""

    caption: str = Field(description="what to draw")
    user: str | None = Field(None, description="a user handle; leave out (and mix) for the base model")
    mix: list[MixEntry] | None = Field(None, description="a weighted mix of users instead of one user")

    @model_validator(mode="after")
    def _one_user_source(self) -> GenerateRequest:
        if self.user is not None and self.mix is not None:
            raise ValueError("give either user or mix, not both")
        return self


class PersonalizeRequest(GenerationParams):
    """A new user's pairs and a caption in one call: images in that user's taste, nothing stored."""

    caption: str = Field(description="what to draw")
    pairs: list[PreferencePair] = Field(description="exactly N preference pairs of one user")


class UserCreated(BaseModel):
    handle: str = Field(description="opaque, random handle of the new user (not a user id; keep it secret)")
    profile: str = Field(description="the embedder's profile text (empty for the pair-difference embedder)")
    embedding_shape: list[int] = Field(description="[L, d] of the user embedding (the embedding itself is never sent)")
    model_id: str
    cached: bool = Field(description="true when these pairs were embedded before (the model did not run again)")


class UserProfile(BaseModel):
    handle: str
    profile: str
    embedding_shape: list[int]
    model_id: str
    created_at: float = Field(description="unix time the handle was created")


class GeneratedImage(BaseModel):
    seed: int
    png_base64: str


class GenerateResponse(BaseModel):
    caption: str
    images: list[GeneratedImage]
    steps: int
    guidance: float
    user_scale: float


class PersonalizeResponse(GenerateResponse):
    profile: str
    embedding_shape: list[int]


class ExamplePairOut(BaseModel):
    caption: str
    image_0: str = Field(description="data: URI (base64 PNG/JPEG); its base64 part is accepted by POST /v1/users")
    image_1: str = Field(description="data: URI (base64 PNG/JPEG); its base64 part is accepted by POST /v1/users")
    source: str = Field(description="file:row_group:row of the split the pair comes from")


class ExamplePairsResponse(BaseModel):
    pairs: list[ExamplePairOut]
    split: str = Field(description="the folder the pairs were drawn from (serve.example_pairs_dir)")
    available: int = Field(description="pairs in that split")


class PageSettings(BaseModel):
    """What the web page needs to know before its first API call (nothing secret: it is open like /healthz)."""

    auth_required: bool = Field(description="true when /v1/* needs `Authorization: Bearer <token>`")
    shots: int = Field(description="preference pairs per user (N)")
    default_user_scale: float
    max_user_scale: float
    default_steps: int
    default_guidance: float
    max_images: int
    max_caption_chars: int
    max_image_bytes: int
    max_image_pixels: int


class ErrorResponse(BaseModel):
    error: str = Field(description="short reason, e.g. invalid_request, unknown_user, unauthorized")
    field: str | None = Field(None, description="the request field at fault, if one is")
    message: str


# --- checks against the configured limits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedGeneration:
    """A generation request's settings after defaults and limits."""

    caption: str
    seeds: list[int]
    steps: int
    guidance: float
    user_scale: float


def check_caption(caption: str, field: str, limits: ServeLimits) -> str:
    """The stripped caption, or a 422 when it is empty or longer than the limit."""
    stripped = caption.strip()
    if not stripped:
        raise RequestError(422, field, "must not be empty")
    if len(stripped) > limits.max_caption_chars:
        raise RequestError(422, field, f"is {len(stripped)} characters; at most {limits.max_caption_chars} allowed")
    return stripped


def check_generation(
    request: GenerateRequest | PersonalizeRequest,
    limits: ServeLimits,
    *,
    default_steps: int,
    default_guidance: float,
    default_user_scale: float,
) -> ResolvedGeneration:
    """Defaults filled in and every bound checked (422 naming the field)."""
    caption = check_caption(request.caption, "caption", limits)
    steps = default_steps if request.steps is None else request.steps
    guidance = default_guidance if request.guidance is None else request.guidance
    user_scale = default_user_scale if request.user_scale is None else request.user_scale
    _at_most("steps", steps, limits.max_steps)
    _at_most("guidance", guidance, limits.max_guidance)
    _at_most("user_scale", user_scale, limits.max_user_scale)
    _at_most("num_images", request.num_images, limits.max_images)
    if request.response_format == "png" and request.num_images != 1:
        raise RequestError(422, "response_format", "png returns one image: set num_images to 1 or use json")
    if request.seed + request.num_images - 1 > 2**31 - 1:
        raise RequestError(422, "seed", "seed + num_images - 1 must stay below 2**31")
    seeds = [request.seed + i for i in range(request.num_images)]
    return ResolvedGeneration(caption, seeds, steps, guidance, user_scale)


def check_mix(mix: list[MixEntry], limits: ServeLimits) -> tuple[list[str], list[float]]:
    """(handles, weights) of a valid mix: 2..max users, distinct, weights >= 0 summing to 1 (pydantic: finite)."""
    if not 2 <= len(mix) <= limits.max_mix_users:
        raise RequestError(422, "mix", f"needs 2 to {limits.max_mix_users} users, got {len(mix)}")
    handles = [entry.user for entry in mix]
    weights = [entry.weight for entry in mix]
    for index, handle in enumerate(handles):
        if handles.index(handle) != index:
            raise RequestError(422, f"mix[{index}].user", "appears twice in the mix")
    total = math.fsum(weights)
    if abs(total - 1.0) > 1e-6:
        raise RequestError(422, "mix", f"weights must sum to 1, got {total:.6g}")
    return handles, weights


def check_handle(handle: str, field: str) -> str:
    """A well-formed handle, or 404 (a malformed handle is as unknown as a deleted one)."""
    if not HANDLE_PATTERN.fullmatch(handle):
        raise RequestError(404, field, "unknown user handle")
    return handle


def check_pairs(pairs: list[PreferencePair], shots: int, limits: ServeLimits) -> list[tuple[str, bytes, bytes, int]]:
    """(caption, image_0 bytes, image_1 bytes, preferred) per pair, every image decoded and within the limits."""
    if len(pairs) != shots:
        raise RequestError(422, "pairs", f"expected exactly {shots} preference pairs, got {len(pairs)}")
    checked = []
    for index, pair in enumerate(pairs):
        caption = check_caption(pair.caption, f"pairs[{index}].caption", limits)
        image_0 = decode_image(pair.image_0, f"pairs[{index}].image_0", limits)
        image_1 = decode_image(pair.image_1, f"pairs[{index}].image_1", limits)
        checked.append((caption, image_0, image_1, pair.preferred))
    return checked


def decode_image(text: str, field: str, limits: ServeLimits) -> bytes:
    """The image bytes of a base64 field after size, pixel and decodability checks (413 / 422 naming the field)."""
    head = text[:64].strip().lower()
    if "://" in head or head.startswith("www."):
        raise RequestError(422, field, "URLs are not accepted; send the image bytes as base64")
    payload = _DATA_URI.sub("", text.strip(), count=1)
    # base64 carries 3 bytes per 4 characters: refuse oversized images before decoding anything.
    if len(payload) // 4 * 3 > limits.max_image_bytes + 3:
        raise RequestError(413, field, f"image is larger than {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, field, "is not valid base64") from None
    if not data:
        raise RequestError(422, field, "is empty")
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, field, f"image is {len(data)} bytes; at most {limits.max_image_bytes} allowed")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The header gives the size: a decompression bomb is refused before its pixels are decoded.
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise RequestError(
                    422, field, f"image is {width}x{height} pixels; at most {limits.max_image_pixels} pixels allowed"
                )
            image.load()
    except RequestError:
        raise
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError (truncated), ValueError, SyntaxError ...
        raise RequestError(422, field, f"is not a decodable image ({type(err).__name__})") from None
    return data


def _at_most(field: str, value: float, limit: float) -> None:
    if value > limit:
        raise RequestError(422, field, f"must be at most {limit:g}, got {value:g}")
