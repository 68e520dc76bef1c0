"""The VLM embedders at the 7B's scale: final-token states without holding every layer, image sides, refused prompts."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ppd.config import EmbedConfig
from ppd.embed.groups import FewShotGroup, groups_from_pairs, groups_from_rows
from ppd.embed.vllm_backend import vllm_available
from ppd.embed.vlm import (
    TINY_VLM_NAME,
    HFVLMEmbedder,
    final_token_states,
    language_model_of,
    left_pad,
    position_ids_for,
    shrink_image,
    tiny_vlm_dir,
)
from tests.helpers import solid_png

GREEDY = EmbedConfig(embedder="vlm-hf", temperature=0.0, max_new_tokens=6, layers="all")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(tiny_vlm_dir(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def groups(toy_world) -> list[FewShotGroup]:
    pairs = pq.read_table(toy_world / "pairs" / "population").to_pandas()
    return groups_from_rows(groups_from_pairs(pairs, shots=4, seed=0)[:3])


def test_hooked_final_token_states_equal_every_hidden_state_of_the_full_output(tiny_path, groups) -> None:
    embedder = HFVLMEmbedder(tiny_path, TINY_VLM_NAME, GREEDY)
    images = [group.images() for group in groups[:2]]
    generations = embedder.generate(groups[:2], images)
    rows = [g.prompt_ids + g.generated_ids for g in generations]
    rows[1] = rows[1][:-3]  # rows of different lengths: the shorter one is left-padded
    states = embedder.states_at_final_token(rows, images)  # [2, 3, 128] through the hooks
    input_ids, attention_mask = left_pad(rows, embedder.tokenizer.pad_token_id)
    vision = embedder.inputs.vision(images).to(embedder.device, embedder.model.dtype)
    with torch.inference_mode():
        full = embedder.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            **vision,
            output_hidden_states=True,
        ).hidden_states  # (embeddings, layer 1, last layer after the final norm), each [2, T, 128]
    assert states.shape == (2, 3, 128) and len(full) == 3
    for layer in range(3):
        np.testing.assert_allclose(states[:, layer], full[layer][:, -1].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        with final_token_states(language_model_of(embedder.model), [3]):
            pass


def _png(side: int, value: int, height: int | None = None) -> bytes:
    return solid_png((value, 255 - value, 90), side, height or side // 2)


def test_images_are_shrunk_to_the_configured_side_and_the_identity_says_so(tiny_path, groups) -> None:
    assert shrink_image(Image.new("RGB", (1024, 512)), 384).size == (384, 192)
    assert shrink_image(Image.new("RGB", (100, 60)), 384).size == (100, 60)  # never enlarged
    cfg = GREEDY.model_copy(update={"max_image_side": 24})
    embedder = HFVLMEmbedder(tiny_path, TINY_VLM_NAME, cfg)
    big = FewShotGroup(0, 1, (0, 1), ("a", "b"), (_png(96, 10), _png(96, 20)), (_png(96, 30), _png(64, 40)), (0, 1))
    assert [image.size for image in embedder._decode(big)] == [(24, 12)] * 4
    assert embedder.identity.settings["max_image_side"] == 24
    plain = HFVLMEmbedder.identity_for(GREEDY, TINY_VLM_NAME, embedder.model.config)
    assert "max_image_side" not in plain.settings  # identities of runs without the setting are unchanged
    (row,) = embedder.embed_groups([big])
    assert row.error is None and row.embedding.shape == (3, 128)


needs_vllm = pytest.mark.skipif(not vllm_available()[0], reason=vllm_available()[1])


@needs_vllm
@pytest.mark.slow
def test_a_prompt_longer_than_the_vllm_context_is_an_error_row_not_a_crash(tiny_path, groups) -> None:
    from ppd.embed.vllm_backend import VLLMEmbedder

    # Square 192 px images: each goes through the tiny tower's any-res grid (6 x 6 tiles, pooled to ~170 tokens), so
    # the group needs ~1.8k tokens; the toy groups (16 px: one tile, 36 tokens per image) need ~660.
    large = FewShotGroup(
        group_id=99,
        user_id=7,
        pair_ids=(1, 2, 3, 4),
        captions=groups[0].captions,
        jpg_0=tuple(_png(192, 40 * i, height=192) for i in range(4)),
        jpg_1=tuple(_png(192, 200 - 40 * i, height=192) for i in range(4)),
        preferred=(0, 1, 0, 1),
    )
    cfg = EmbedConfig(embedder="vlm-vllm", temperature=0.0, max_new_tokens=4, layers="last", max_model_len=1024)
    embedder = VLLMEmbedder(tiny_path, TINY_VLM_NAME, cfg)
    rows = embedder.embed_groups([groups[0], large, groups[1]])
    assert [row.group_id for row in rows] == [groups[0].group_id, 99, groups[1].group_id]
    assert rows[1].embedding is None and "refused" in rows[1].error
    assert rows[0].error is None and rows[2].error is None
    assert rows[0].embedding.shape == rows[2].embedding.shape == (1, 128)
