"""Contrastive pretraining of the tiny text encoder: it learns to tell the toy world's captions apart by what their
images show, and the prior's pretraining takes it frozen from the first step."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection

from ppd.config import smoke
from ppd.models.text import build_tiny_clip_tokenizer, tiny_clip_text_config
from ppd.train.pretrain import PretrainSettings, pretrain_toy_base
from ppd.train.text_pretrain import TextPretrainSettings, pretrain_text_encoder, word_separation


def _fresh_encoder(seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    return tokenizer, CLIPTextModelWithProjection(tiny_clip_text_config(tokenizer))


def test_contrastive_steps_teach_the_encoder_to_find_each_captions_image():
    tokenizer, encoder = _fresh_encoder()
    settings = TextPretrainSettings(steps=120, batch_size=16, lr=3e-3, warmup_steps=10)
    losses: list[float] = []
    summary = pretrain_text_encoder(tokenizer, encoder, 16, settings, progress=lambda s, loss, a: losses.append(loss))
    assert summary["steps"] == 120 and summary["batch_size"] == 16
    # chance: ln(16) = 2.77 nats and 1/16 of the images; fresh renders every step, so this is not memorisation
    assert summary["final_loss"] < 2.3, summary
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())  # frozen afterwards


def test_word_separation_reads_colour_and_shape_only_from_an_encoder_that_knows_them():
    tokenizer, encoder = _fresh_encoder()
    random = word_separation(tokenizer, encoder)
    assert set(random) == {"pooled_colour", "pooled_shape", "hidden_colour", "hidden_shape"}
    assert max(random.values()) < 0.8  # a random encoder: far from a perfect probe on held-out captions
    # give each colour and shape word its own direction in the token embeddings: the probes must then be perfect
    embeddings = encoder.text_model.embeddings.token_embedding.weight
    from ppd.data.toyworld import COLOUR_HUES, SHAPES

    with torch.no_grad():
        for k, word in enumerate([*COLOUR_HUES, *SHAPES]):
            (token_id,) = tokenizer(word, add_special_tokens=False).input_ids
            embeddings[token_id] = 0
            embeddings[token_id, k % embeddings.shape[1]] = 30.0 * (1 + k // embeddings.shape[1])
    planted = word_separation(tokenizer, encoder)
    assert planted["hidden_colour"] == 1.0 and planted["hidden_shape"] == 1.0, planted


def _base_against_a_saved_encoder(tmp_path, seed: int) -> dict[str, torch.Tensor]:
    """Save a fresh text encoder, pretrain a 2-step base against it into tmp_path/base; returns the encoder's weights."""
    tokenizer, encoder = _fresh_encoder(seed=seed)
    encoder.save_pretrained(tmp_path / "text" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "text" / "tokenizer")
    settings = PretrainSettings(steps=2, batch_size=4, warmup_steps=1, seed=1, text_encoder_from=tmp_path / "text")
    pretrain_toy_base(smoke(), settings, tmp_path / "base")
    return load_file(tmp_path / "text" / "text_encoder" / "model.safetensors")


def test_the_prior_trains_against_a_given_text_encoder_frozen_from_the_first_step(tmp_path):
    given = _base_against_a_saved_encoder(tmp_path, seed=5)
    saved = load_file(tmp_path / "base" / "text_encoder" / "model.safetensors")
    assert given.keys() == saved.keys() and all(torch.equal(given[k], saved[k]) for k in given)


def test_the_command_writes_an_encoder_the_base_pretraining_takes_and_says_what_it_learnt(tmp_path):
    import json

    from typer.testing import CliRunner

    from ppd_ray.cli.main import app

    out = tmp_path / "text"
    result = CliRunner().invoke(app, ["toy", "pretrain-text", "--out", str(out), "--steps", "3", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "hidden_shape" in result.output and f"--text-encoder-from {out}" in result.output
    record = json.loads((out / "text_pretraining.json").read_text())
    assert record["steps"] == 3 and set(record["probe_after"]) == set(record["probe_before"])
    assert CLIPTextModelWithProjection.from_pretrained(out / "text_encoder").config.projection_dim > 0
    missing = CliRunner().invoke(app, ["toy", "pretrain-base", "--text-encoder-from", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0 and "pretrain-text" in missing.output


def test_continuing_such_a_base_keeps_its_text_encoder_frozen(tmp_path):
    given = _base_against_a_saved_encoder(tmp_path, seed=6)
    # a later chunk without --text-encoder-from (text_encoder_steps would otherwise train it for 3,000 steps)
    more = PretrainSettings(steps=4, batch_size=4, warmup_steps=1, seed=1, resume_from=tmp_path / "base")
    pretrain_toy_base(smoke(), more, tmp_path / "more")
    saved = load_file(tmp_path / "more" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(given[k], saved[k]) for k in given)
    # and a chunk after that one: the record of the second chunk (no --text-encoder-from) still says so
    third = PretrainSettings(steps=6, batch_size=4, warmup_steps=1, seed=1, resume_from=tmp_path / "more")
    pretrain_toy_base(smoke(), third, tmp_path / "third")
    saved = load_file(tmp_path / "third" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(given[k], saved[k]) for k in given)
