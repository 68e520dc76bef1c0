"""The chain-of-thought prompt that turns a user's few-shot pairs into a "User Profile" (paper Table 2, our words).

The prompt interleaves every pair as caption, image 1, image 2 and the user's choice, then asks the model to describe
each image, explain the differences and end with a line starting "User Profile:". It is rendered in the Qwen2 chat
format of LLaVA-OneVision (`<|im_start|>role ... <|im_end|>`), with one image placeholder per image at the exact place
the image belongs: the stock chat template would put all images first and lose which caption and choice go with them.

Every embedding row stores `prompt_hash()`: the hash of the templates below, so embeddings made with different
prompts are never mixed (the embedding job's resume logic keys on it too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

# Bump when the rendering code changes in a way the templates below do not show (e.g. the chat format).
PROMPT_VERSION = "cot-profile-v1"

SYSTEM_PROMPT = (
    "You judge images for a living: composition, colour, light, style and overall appeal. "
    "Your job is to work out what a particular person likes from the choices they made."
)

INTRODUCTION = (
    "Below are {n_pairs} comparisons made by one person. In each, two images were generated for the same caption "
    "and the person picked the one they liked better."
)

PAIR_TEMPLATE = (
    "Comparison {index}. Caption: {caption}\nImage 1: {image}\nImage 2: {image}\nThe person chose: Image {choice}"
)

INSTRUCTIONS = (
    "Work through the comparisons step by step.\n"
    "1. For every comparison, say what each image shows and how it looks: style, colour, light, composition, "
    "technical quality.\n"
    "2. Then say how the two images of that comparison differ in those respects.\n"
    "3. Once every comparison is covered, sum up what separates the chosen images from the rejected ones: "
    "that summary is the person's profile.\n"
    "Answer in this layout, one block per comparison:\n"
    "Comparison 1: Image 1: <description> Image 2: <description> Differences: <description>\n"
    "...\n"
    "Comparison {n_pairs}: Image 1: <description> Image 2: <description> Differences: <description>\n"
    "User Profile: <what this person prefers>"
)

# Qwen2 chat format used by LLaVA-OneVision; the assistant turn is left open for generation.
CHAT_TEMPLATE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def render_prompt(captions: Sequence[str], preferred: Sequence[int], image_placeholder: str = "<image>") -> str:
    """The chat-formatted prompt for one few-shot group; `preferred[i]` is 0 if the user chose jpg_0 of pair i.

    Image placeholders come in the order jpg_0, jpg_1 of pair 1, then pair 2, ...: pass the images in that order.
    """
    if len(captions) != len(preferred):
        raise ValueError(f"{len(captions)} captions but {len(preferred)} choices")
    if not captions:
        raise ValueError("a few-shot group needs at least one pair")
    pairs = [
        PAIR_TEMPLATE.format(index=i + 1, caption=caption.strip(), image=image_placeholder, choice=int(choice) + 1)
        for i, (caption, choice) in enumerate(zip(captions, preferred, strict=True))
    ]
    user = "\n\n".join([INTRODUCTION.format(n_pairs=len(captions)), *pairs, INSTRUCTIONS.format(n_pairs=len(captions))])
    return CHAT_TEMPLATE.format(system=SYSTEM_PROMPT, user=user)


def prompt_hash(templates: Sequence[str] | None = None) -> str:
    """A short content hash (12 hex digits) of the prompt templates, stored with every embedding.

    Without arguments: the templates `render_prompt` uses now. Other embedders hash their own recipe text.
    """
    if templates is None:
        templates = (PROMPT_VERSION, SYSTEM_PROMPT, INTRODUCTION, PAIR_TEMPLATE, INSTRUCTIONS, CHAT_TEMPLATE)
    digest = hashlib.sha256("\x1e".join(templates).encode()).hexdigest()
    return digest[:12]


def profile_text(generated: str) -> str:
    """The "User Profile" part of a generation (the whole text when the model did not write that heading)."""
    head, marker, tail = generated.rpartition("User Profile:")
    return tail.strip() if marker else generated.strip()
