"""The preference judge (paper supplementary B.3): shown a user's few-shot pairs and a new pair, which image wins?

Each query is asked twice, with the two new images swapped; a verdict that changes with the order is
inconsistent and dropped (counted). Backends: an oracle from the toy world's hidden rewards, and any
OpenAI-compatible chat endpoint (a vLLM server, a hosted model).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class JudgeQuery:
    """The user's context pairs and a new pair to judge (images as PNG/JPEG bytes)."""

    context_captions: Sequence[str]
    context_first: Sequence[bytes]
    context_second: Sequence[bytes]
    context_preferred: Sequence[int]  # 0 = the user preferred the first image, 1 = the second
    caption: str
    image_a: bytes
    image_b: bytes
    user_id: int | None = None  # whose taste is judged; backends that know users (the toy oracle) read it
    profile: str | None = None  # the user's profile text from the embedder (VLM embedders write one), if any


# A judge answers 0 (first image shown) or 1 (second image shown), or None when its answer cannot be parsed.
Verdict = int | None


@dataclass(frozen=True)
class JudgeReport:
    """Consistent verdicts and how many were dropped."""

    preferred: list[int | None]  # per query: 0 = image_a, 1 = image_b, None = dropped (inconsistent/unparsable)
    dropped: int

    @property
    def dropped_share(self) -> float:
        return self.dropped / max(1, len(self.preferred))

    def accuracy(self, truth: Sequence[int]) -> float:
        """Share of kept verdicts that match `truth` (0 = image_a preferred); NaN if none was kept."""
        kept = [(v, t) for v, t in zip(self.preferred, truth, strict=True) if v is not None]
        return float(np.mean([v == t for v, t in kept])) if kept else float("nan")


def consistent_verdict(forward: Verdict, swapped: Verdict) -> int | None:
    """Combine the verdicts of (a, b) and (b, a): kept only if both name the same image."""
    if forward is None or swapped is None:
        return None
    image_in_swapped = 1 - swapped  # position 0 of the swapped question was image_b
    return forward if forward == image_in_swapped else None


def judge_pairs(queries: Sequence[JudgeQuery], ask: Callable[[JudgeQuery, bool], Verdict]) -> JudgeReport:
    """Ask each query in both orders (`ask(query, swapped)`) and keep the consistent verdicts."""
    preferred = [consistent_verdict(ask(q, False), ask(q, True)) for q in queries]
    return JudgeReport(preferred, sum(v is None for v in preferred))


def oracle_judge(reward: Callable[[bytes], float]) -> Callable[[JudgeQuery, bool], Verdict]:
    """The toy world's judge: the hidden reward of the user decides (ties -> the first shown, so ties are dropped)."""

    def ask(query: JudgeQuery, swapped: bool) -> Verdict:
        first, second = (query.image_b, query.image_a) if swapped else (query.image_a, query.image_b)
        return 0 if reward(first) >= reward(second) else 1

    return ask


_ANSWER = re.compile(r"\b(?:image\s*)?([12])\b", re.IGNORECASE)
# The last line of a chain-of-thought verdict, as the prompt asks for it.
_FINAL_ANSWER = re.compile(r"preference\s*:\s*\[?\s*(?:image\s*)?([12])\b", re.IGNORECASE)


def parse_answer(text: str) -> Verdict:
    """'Image 1' / '1' -> 0, 'Image 2' / '2' -> 1; anything else (or both) -> None."""
    found = {m.group(1) for m in _ANSWER.finditer(text or "")}
    if len(found) != 1:
        return None
    return int(found.pop()) - 1


def parse_reasoned_answer(text: str) -> Verdict:
    """The verdict of a chain-of-thought reply: its last 'Preference: 1|2' (the reasoning may name both images)."""
    found = _FINAL_ANSWER.findall(text or "")
    return int(found[-1]) - 1 if found else None


def _image_part(data: bytes, max_side: int | None = None) -> dict:
    if max_side is not None:
        data = _shrunk(data, max_side)
    kind = "png" if data[:4] == b"\x89PNG" else "jpeg"
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{base64.b64encode(data).decode()}"}}


def _shrunk(data: bytes, max_side: int) -> bytes:
    """PNG/JPEG bytes with the longer side brought down to `max_side` (re-encoded as PNG); smaller ones unchanged."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if max(image.size) <= max_side:
            return data
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        buffer = io.BytesIO()
        image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


# Supplementary B.3 / Table 2, in our own words: a system role, the labelled examples with a chain of thought
# (describe, contrast, sum up as a profile), then the prediction for the new pair.
JUDGE_SYSTEM_PROMPT = (
    "You judge images on behalf of one particular person. From pairs of images this person has already compared, "
    "you work out their taste in style, quality and look, and predict which of two new images they would choose."
)
REASONING_STEPS = (
    "Before answering: (1) for each example, describe both images: style, visual quality, look; (2) say how the two "
    "images of each example differ; (3) sum up in a short profile what the chosen images have that the others lack."
)
FINAL_LINE = "Finish your reply with a single line of the form 'Preference: 1' or 'Preference: 2'."


def chat_messages(
    query: JudgeQuery, swapped: bool, chain_of_thought: bool = False, max_image_side: int | None = None
) -> list[dict]:
    """The judge prompt as OpenAI chat messages: the user's examples, then the new pair.

    `chain_of_thought`: B.3's protocol (system role, reasoning steps, the profile when known, a final
    'Preference: N' line); otherwise a bare 'answer 1 or 2' question (short, for greedy checks).
    `max_image_side` shrinks every image first (a VLM judge's context holds 2 x shots + 2 of them)."""

    def part(data: bytes) -> dict:
        return _image_part(data, max_image_side)

    content: list[dict] = [
        {
            "type": "text",
            "text": "Here are examples of one person's taste in images. In each example they saw a "
            "caption and two images and chose the one they liked more.",
        }
    ]
    for i, (caption, first, second, choice) in enumerate(
        zip(query.context_captions, query.context_first, query.context_second, query.context_preferred, strict=True), 1
    ):
        content += [
            {"type": "text", "text": f"Example {i}. Caption: {caption}. Image 1:"},
            part(first),
            {"type": "text", "text": "Image 2:"},
            part(second),
            {"type": "text", "text": f"They preferred image {choice + 1}."},
        ]
    if chain_of_thought:
        content.append({"type": "text", "text": REASONING_STEPS})
        if query.profile:
            content.append(
                {"type": "text", "text": f"A profile of this person, written from these examples: {query.profile}"}
            )
    first, second = (query.image_b, query.image_a) if swapped else (query.image_a, query.image_b)
    content += [
        {"type": "text", "text": f"New caption: {query.caption}. Image 1:"},
        part(first),
        {"type": "text", "text": "Image 2:"},
        part(second),
    ]
    if chain_of_thought:
        content.append({"type": "text", "text": "Which new image would this person prefer? " + FINAL_LINE})
        return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": content}]
    content.append({"type": "text", "text": "Which image would this person prefer? Answer with 1 or 2 only."})
    return [{"role": "user", "content": content}]


def openai_judge(
    base_url: str,
    model: str,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    max_tokens: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chain_of_thought: bool = False,
    max_retries: int = 2,
    extra_body: Mapping[str, Any] | None = None,
    max_image_side: int | None = None,
) -> Callable[[JudgeQuery, bool], Verdict]:
    """A judge backed by an OpenAI-compatible chat endpoint (the `openai` client: retries, timeouts).

    Defaults are a greedy, short answer; the evaluation's judge (`make_judge`) runs B.3's protocol instead:
    chain of thought, temperature 1.0, top-p 1.0, verdict parsed from the final 'Preference: N' line. `extra_body`
    adds request fields, e.g. vLLM's `{"structured_outputs": {"choice": ["1", "2"]}}` for a bare answer;
    `max_image_side` shrinks the images before they are sent.
    """
    from openai import OpenAI

    # The endpoint may need no key (a local vLLM server); the client insists on one, so send a placeholder.
    client = OpenAI(
        base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "none", timeout=timeout_s, max_retries=max_retries
    )
    parse = parse_reasoned_answer if chain_of_thought else parse_answer

    def ask(query: JudgeQuery, swapped: bool) -> Verdict:
        response = client.chat.completions.create(
            model=model,
            messages=chat_messages(query, swapped, chain_of_thought, max_image_side),
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            extra_body=dict(extra_body or {}) or None,
        )
        return parse(response.choices[0].message.content or "")

    return ask
