"""Model factory: tiny models saved and reloaded through from_pretrained, cache reuse, real sizes, `ppd model info`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPTokenizer
from typer.testing import CliRunner

from ppd.config import ModelConfig, load_config
from ppd.models.codec import ToyCodec
from ppd.models.factory import (
    TINY_MODELS_SEED,
    build_meta_personalized_stage_c,
    build_personalized_stage_c,
    latent_shape,
    load_caption_encoder,
    load_stage_c,
    tiny_models_dir,
)
from ppd.models.stage_c import build_stage_c, stage_c_unet_config
from ppd.models.text import build_tiny_clip_tokenizer
from ppd_ray.cli.model import model_app


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("factory-cache")


def test_tiny_prior_loads_back_with_the_built_weights(cache_dir) -> None:
    loaded = load_stage_c(ModelConfig(architecture="tiny", cache_dir=str(cache_dir)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_MODELS_SEED)
        built = build_stage_c("tiny").eval()  # the first model the tiny build draws from the seed
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 12, 8, 8, generator=generator),
        "timestep_ratio": torch.rand(2, generator=generator),
        "clip_text_pooled": torch.randn(2, 1, 32, generator=generator),
        "clip_text": torch.randn(2, 7, 32, generator=generator),
        "clip_img": torch.zeros(2, 1, 32),
    }
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, built(**inputs).sample)
    assert all(not p.requires_grad for p in loaded.parameters())
    # The default config's latent grid is the toy codec's for the toy world's images: 3 x 2² channels, side / 2.
    side = load_config("tiny_cpu").data.toy.image_size
    assert latent_shape(ModelConfig()) == ToyCodec(2).latent_shape(side) == (12, side // 2, side // 2)


def test_second_call_reuses_the_cache(cache_dir) -> None:
    first = tiny_models_dir(cache_dir)
    stamps = {path: path.stat().st_mtime_ns for path in first.rglob("*") if path.is_file()}
    second = tiny_models_dir(cache_dir)
    assert second == first
    assert {path: path.stat().st_mtime_ns for path in second.rglob("*") if path.is_file()} == stamps
    assert sorted(p.name for p in first.iterdir()) == ["decoder", "prior", "text_encoder", "tokenizer", "vqgan"]


def test_tiny_builds_are_identical_across_machines(cache_dir, tmp_path) -> None:
    # Every Ray node builds its own cache: the weights must not depend on where or when they were built.
    torch.manual_seed(1234)  # the caller's RNG state must not matter either
    elsewhere = tiny_models_dir(tmp_path)
    for part, weights in (("prior", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        assert (elsewhere / part / weights).read_bytes() == (tiny_models_dir(cache_dir) / part / weights).read_bytes()


def test_caption_encoder_round_trips_the_tokenizer_and_shapes(cache_dir) -> None:
    encoder = load_caption_encoder(ModelConfig(architecture="tiny", cache_dir=str(cache_dir)))
    caption = "a small red circle on a blue background"
    fresh = build_tiny_clip_tokenizer()
    assert encoder.tokenizer(caption).input_ids == fresh(caption).input_ids
    assert isinstance(encoder.tokenizer, CLIPTokenizer)
    hidden, pooled = encoder.encode_captions([caption, "a green square", caption])
    assert hidden.shape == (3, 77, 32) and pooled.shape == (3, 1, 32)
    assert torch.allclose(hidden[0], hidden[2]) and not torch.allclose(pooled[0], pooled[1])


def test_the_tiny_tokenizer_is_the_same_on_every_build() -> None:
    # The project builds it on every machine (and every pretraining run): a tie broken by hash order would give each
    # build its own vocabulary, and a saved text encoder would read other token ids than it was trained on.
    first, second = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()  # merges included
    caption = "an image showing a teal diamond"
    assert first(caption).input_ids == second(caption).input_ids
    assert first.decode(first(caption).input_ids, skip_special_tokens=True).strip() == caption
    assert len(first(caption).input_ids) == 2 + len(caption.split())  # every grammar word is one token


def test_personalised_model_from_the_factory_trains_only_the_adapter(cache_dir) -> None:
    model = build_personalized_stage_c(ModelConfig(architecture="tiny", cache_dir=str(cache_dir)), (4, 24))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.adapter.parameters())
    # 6 attention blocks of width 64 with c_cond = 64: W'_k + W'_v = 2 · 64 · 64 · 6
    counts = model.adapter.parameter_counts()
    assert counts["w_k"] + counts["w_v"] == 2 * 64 * 64 * 6


def test_real_architectures_have_the_published_sizes() -> None:
    lite = build_meta_personalized_stage_c("stage_c_lite", (29, 3584), user_tokens=4)
    full = build_meta_personalized_stage_c("stage_c", (29, 3584), user_tokens=4)
    # Lite: blocks [[4, 12], [12, 4]] = 32 attention blocks; full: [[8, 24], [24, 8]] = 64.
    assert len(lite.adapter.user_kv) == 32 and len(full.adapter.user_kv) == 64
    assert next(lite.base.parameters()).is_meta
    base_lite = sum(p.numel() for p in lite.base.parameters())
    base_full = sum(p.numel() for p in full.base.parameters())
    assert 0.95e9 < base_lite < 1.1e9  # "Stage C lite 1B"
    assert 3.5e9 < base_full < 3.7e9  # "Stage C 3.6B"
    assert stage_c_unet_config("stage_c_lite")["block_out_channels"] == (1536, 1536)


def test_model_info_cli_reports_the_paper_adapter_size() -> None:
    result = CliRunner().invoke(model_app, ["info", "--preset", "stage_c_lite", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    # W'_k, W'_v: 1536 x 1536 each in 32 attention blocks = 150,994,944 (paper: ~150M trainable).
    assert report["w_k_plus_w_v"] == pytest.approx(2 * 1536 * 1536 * 32, rel=0.01)
    assert report["embedding_shape"] == [29, 3584]
    assert report["total"] == report["base"] + report["trainable"]

    from_preset = CliRunner().invoke(model_app, ["info", "--preset", "stage_c_h100x8", "--embedding-shape", "1x3584"])
    assert from_preset.exit_code == 0, from_preset.output
    assert "64 attention blocks" in from_preset.output and "[1, 3584]" in from_preset.output

    bad = CliRunner().invoke(model_app, ["info", "--preset", "stage_c_lite", "--embedding-shape", "29by3584"])
    assert bad.exit_code != 0
