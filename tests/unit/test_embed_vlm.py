"""The transformers LLaVA-OneVision backend on the tiny model: batching, layers, the position of the embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ppd.config import EmbedConfig
from ppd.embed.groups import FewShotGroup, groups_from_pairs, groups_from_rows
from ppd.embed.vlm import TINY_VLM_NAME, HFVLMEmbedder, left_pad, position_ids_for, tiny_vlm_dir

GREEDY = EmbedConfig(embedder="vlm-hf", temperature=0.0, max_new_tokens=8, layers="last")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return str(tiny_vlm_dir(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def groups(toy_world) -> list[FewShotGroup]:
    pairs = pq.read_table(toy_world / "pairs" / "population").to_pandas()
    return groups_from_rows(groups_from_pairs(pairs, shots=4, seed=0)[:4])


@pytest.fixture(scope="module")
def embedder(tiny_path) -> HFVLMEmbedder:
    return HFVLMEmbedder(tiny_path, TINY_VLM_NAME, GREEDY)


def test_tiny_model_is_saved_and_reloaded_from_its_directory(tiny_path, embedder):
    directory = Path(tiny_path)
    stamp = (directory / "model.safetensors").stat().st_mtime_ns
    assert tiny_vlm_dir(directory.parent) == directory  # reused, not rebuilt
    assert (directory / "model.safetensors").stat().st_mtime_ns == stamp
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    tokenizer = embedder.tokenizer
    for token in ("<|im_start|>", "<|im_end|>", "<image>", "<video>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(token) is not None
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1  # a single special token
    assert type(embedder.model).__name__ == "LlavaOnevisionForConditionalGeneration"


def test_image_token_count_matches_the_models_own_features(embedder, groups):
    images = [group.images() for group in groups[:2]]
    vision = embedder.inputs.vision(images, "multi-image").to(embedder.device, embedder.model.dtype)
    with torch.inference_mode():
        features = embedder.model.model.get_image_features(**vision).pooler_output  # one [tokens, d] per image
    assert len(features) == 16
    assert {f.shape[0] for f in features} == {embedder.inputs.tokens_per_image()} == {4 * 4 + 1}
    # and a whole prompt carries exactly that many placeholders per image
    text = embedder.inputs.tokenize(embedder.prompts(groups[:1]))
    assert int((text["input_ids"] == embedder.inputs.image_token_id).sum()) == 8 * 17


def test_batched_rows_equal_single_row_runs(embedder, groups):
    batched = embedder.embed_groups(groups)
    singles = [embedder.embed_groups([group])[0] for group in groups]
    prompt_lengths = {len(embedder.inputs.tokenize(embedder.prompts([g]))["input_ids"][0]) for g in groups}
    assert len(prompt_lengths) > 1  # the batch really was left-padded
    for row, single in zip(batched, singles, strict=True):
        assert row.generated_text == single.generated_text
        np.testing.assert_allclose(row.embedding, single.embedding, atol=1e-5)
        assert row.embedding.shape == (1, 128) and row.embedding.dtype == np.float32


@pytest.mark.parametrize(("layers", "expected"), [("all", [0, 1, 2]), ([0, -1], [0, 2]), ([1], [1])])
def test_layer_selection_shapes(tiny_path, groups, layers, expected):
    cfg = GREEDY.model_copy(update={"layers": layers, "max_new_tokens": 4})
    row = HFVLMEmbedder(tiny_path, TINY_VLM_NAME, cfg).embed_groups(groups[:1])[0]
    assert row.layers == expected
    assert row.embedding.shape == (len(expected), 128)


def test_layer_indices_out_of_range_are_refused(tiny_path):
    with pytest.raises(ValueError, match="out of range: the model has 3 hidden states"):
        HFVLMEmbedder(tiny_path, TINY_VLM_NAME, GREEDY.model_copy(update={"layers": [3]}))


def test_all_layers_are_embeddings_then_layers_with_the_last_equal_to_last(tiny_path, embedder, groups):
    all_layers = HFVLMEmbedder(tiny_path, TINY_VLM_NAME, GREEDY.model_copy(update={"layers": "all"}))
    generation = all_layers.generate(groups[:1], [groups[0].images()])[0]
    state = all_layers.embed_groups(groups[:1])[0].embedding  # [3, 128]
    last = embedder.embed_groups(groups[:1])[0].embedding  # [1, 128]
    np.testing.assert_allclose(state[-1], last[0], atol=1e-6)
    # layer 0 is the input embedding of the final token (a text token, so no image feature is merged in)
    token_embedding = all_layers.model.get_input_embeddings().weight[generation.generated_ids[-1]]
    np.testing.assert_allclose(state[0], token_embedding.detach().numpy(), atol=1e-6)


def test_embedding_is_the_state_at_the_final_generated_token(embedder, groups):
    """Not the state that produced it, which is what generate(output_hidden_states=True) returns."""
    group = groups[0]
    images = [group.images()]
    row = embedder.embed_groups([group])[0]
    text = embedder.inputs.tokenize(embedder.prompts([group]))
    vision = embedder.inputs.vision(images).to(embedder.device, embedder.model.dtype)
    with torch.inference_mode():
        generated = embedder.model.generate(
            **text,
            **vision,
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            output_hidden_states=True,
            return_dict_in_generate=True,
            suppress_tokens=embedder.placeholder_ids(),
            pad_token_id=embedder.tokenizer.pad_token_id,
        )
        full_ids = generated.sequences  # [1, P + G], one row: no padding anywhere
        reference = embedder.model(input_ids=full_ids, **vision, output_hidden_states=True).hidden_states[-1][0]
    at_final, before_final = reference[-1].numpy(), reference[-2].numpy()
    producing = generated.hidden_states[-1][-1][0, -1].numpy()  # last generation step, last layer, its input token

    np.testing.assert_allclose(row.embedding[0], at_final, atol=1e-5)
    np.testing.assert_allclose(producing, before_final, atol=1e-5)  # generate's state sits one token earlier
    assert np.abs(row.embedding[0] - producing).max() > 1e-2
    assert row.generated_text == embedder.tokenizer.decode(
        full_ids[0, text["input_ids"].shape[1] :], skip_special_tokens=True
    )


def test_left_padding_positions_count_real_tokens_only():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert position_ids_for(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_sampling_is_seeded_and_temperature_changes_the_profile(tiny_path, groups):
    sampled = GREEDY.model_copy(update={"temperature": 0.7, "max_new_tokens": 12, "seed": 3})
    first = HFVLMEmbedder(tiny_path, TINY_VLM_NAME, sampled).embed_groups(groups[:2])
    second = HFVLMEmbedder(tiny_path, TINY_VLM_NAME, sampled).embed_groups(groups[:2])
    assert [r.generated_text for r in first] == [r.generated_text for r in second]
    np.testing.assert_array_equal(first[0].embedding, second[0].embedding)
    assert first[0].settings != HFVLMEmbedder(tiny_path, TINY_VLM_NAME, GREEDY).identity.settings_json


def test_undecodable_image_gives_an_error_row_and_the_rest_are_embedded(embedder, groups):
    broken = FewShotGroup(**{**groups[1].__dict__, "jpg_1": (b"not an image", *groups[1].jpg_1[1:])})
    rows = embedder.embed_groups([groups[0], broken, groups[2]])
    assert [r.group_id for r in rows] == [groups[0].group_id, broken.group_id, groups[2].group_id]
    assert rows[1].embedding is None and "pair 1: undecodable image" in rows[1].error
    assert rows[0].error is None and rows[2].error is None
    np.testing.assert_allclose(rows[2].embedding, embedder.embed_groups([groups[2]])[0].embedding, atol=1e-5)


def test_rows_carry_the_contract_fields(embedder, groups):
    from ppd.embed.prompt import prompt_hash

    row = embedder.embed_groups(groups[:1])[0]
    assert (row.user_id, row.group_id, row.pair_ids) == (
        groups[0].user_id,
        groups[0].group_id,
        list(groups[0].pair_ids),
    )
    assert row.model_id == TINY_VLM_NAME and row.prompt_hash == prompt_hash()
    assert isinstance(row.profile, str) and row.profile == row.generated_text.strip()  # no "User Profile:" heading
    assert pd.Series([row.settings]).str.contains('"temperature": 0.0').all()


def test_image_placeholders_are_never_generated(tiny_path, groups):
    """A generated <image> would be read as an image slot by the forward pass: make it the model's favourite."""
    embedder = HFVLMEmbedder(tiny_path, TINY_VLM_NAME, GREEDY)
    favourite = embedder.generate(groups[:1], [groups[0].images()])[0].generated_ids[0]
    with torch.no_grad():
        lm_head = embedder.model.get_output_embeddings().weight
        for placeholder in embedder.placeholder_ids():
            lm_head[placeholder] = 2 * lm_head[favourite]  # twice the winning logit (positive: it won)
    rows = embedder.embed_groups(groups[:2])
    generation = embedder.generate(groups[:1], [groups[0].images()])[0]
    assert generation.generated_ids[0] == favourite
    assert all(row.error is None and row.embedding.shape == (1, 128) for row in rows)
    assert not set(embedder.placeholder_ids()) & set(generation.generated_ids)
