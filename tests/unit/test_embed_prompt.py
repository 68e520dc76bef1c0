"""The chain-of-thought prompt: interleaved pairs, versioned by a hash."""

import re

import pytest

from ppd.embed import prompt as cot


def test_prompt_interleaves_caption_images_and_choice_per_pair():
    captions = ["a red circle", "a blue star", "a teal ring", "a grey cross"]
    preferred = [0, 1, 1, 0]
    text = cot.render_prompt(captions, preferred, image_placeholder="<IMG>")

    assert text.count("<IMG>") == 2 * len(captions)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    # Pair by pair: caption, then image 1, then image 2, then the choice (1-based), before the next caption.
    positions = []
    for caption, choice in zip(captions, preferred, strict=True):
        start = text.index(caption)
        first, second = text.index("<IMG>", start), text.index("<IMG>", text.index("<IMG>", start) + 1)
        chose = re.compile(r"The person chose: Image (\d)").search(text, second)
        assert int(chose.group(1)) == choice + 1
        positions.append((start, first, second, chose.start()))
    assert all(a < b < c < d for a, b, c, d in positions)
    assert all(prev[3] < nxt[0] for prev, nxt in zip(positions, positions[1:], strict=False))
    # The instructions come after every pair and ask for the profile heading.
    assert text.index("User Profile:") > positions[-1][3]


def test_prompt_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 captions but 1 choices"):
        cot.render_prompt(["a", "b"], [0])


def test_prompt_hash_changes_with_any_template_and_is_stable():
    base = cot.prompt_hash()
    assert base == cot.prompt_hash() and re.fullmatch(r"[0-9a-f]{12}", base)
    templates = [
        cot.PROMPT_VERSION,
        cot.SYSTEM_PROMPT,
        cot.INTRODUCTION,
        cot.PAIR_TEMPLATE,
        cot.INSTRUCTIONS,
        cot.CHAT_TEMPLATE,
    ]
    for index in range(len(templates)):
        changed = list(templates)
        changed[index] = changed[index] + " "
        assert cot.prompt_hash(changed) != base


def test_prompt_hash_follows_the_templates_render_prompt_uses(monkeypatch):
    before_hash, before_text = cot.prompt_hash(), cot.render_prompt(["a red circle"], [0])
    monkeypatch.setattr(cot, "INSTRUCTIONS", cot.INSTRUCTIONS.replace("step by step", "carefully"))
    assert cot.render_prompt(["a red circle"], [0]) != before_text
    assert cot.prompt_hash() != before_hash


def test_profile_text_takes_the_last_user_profile_section():
    generated = "Comparison 1: ... User Profile: draft\nMore text. User Profile: likes bright, centred shapes. "
    assert cot.profile_text(generated) == "likes bright, centred shapes."
    assert cot.profile_text("  no heading here ") == "no heading here"
