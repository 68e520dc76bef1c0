"""Stable Cascade's EfficientNet latent encoder: the real module and key layout, loaded from safetensors only."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ppd.config import ModelConfig
from ppd.models.effnet import (
    EFFNET_FILE,
    EfficientNetEncoder,
    EffnetLatentEncoder,
    imagenet_normalise,
    load_effnet_encoder,
)
from ppd.train.precompute import encode_pairs, load_latent_encoder


@pytest.fixture(scope="module")
def saved_encoder(tmp_path_factory) -> tuple[EfficientNetEncoder, object]:
    """A randomly initialised encoder (non-trivial BatchNorm statistics) saved as the hub file is named."""
    torch.manual_seed(0)
    encoder = EfficientNetEncoder().eval()
    with torch.no_grad():  # running statistics as after training, so that the BatchNorm is not the identity
        encoder.mapper[1].running_mean.uniform_(-0.5, 0.5)
        encoder.mapper[1].running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("effnet")
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, folder / EFFNET_FILE)
    return encoder, folder


def test_key_layout_is_stable_cascades() -> None:
    with torch.device("meta"):
        encoder = EfficientNetEncoder()
    keys = list(encoder.state_dict())
    assert all(key.startswith(("backbone.", "mapper.")) for key in keys)
    assert "mapper.0.weight" in keys and "mapper.0.bias" not in keys  # 1x1 conv 1280 -> 16 without bias
    assert {"mapper.1.running_mean", "mapper.1.running_var"} <= set(keys)
    assert "mapper.1.weight" not in keys  # BatchNorm2d(16, affine=False)
    assert tuple(encoder.state_dict()["mapper.0.weight"].shape) == (16, 1280, 1, 1)
    # 768 px -> the 16 x 24 x 24 latents of the real Stage C (shapes only, on the meta device).
    assert encoder(torch.empty(1, 3, 768, 768, device="meta")).shape == (1, 16, 24, 24)


def test_loaded_encoder_matches_the_module_run_directly(saved_encoder) -> None:
    reference, folder = saved_encoder
    loaded = load_effnet_encoder(folder)  # a folder: the file name of the hub repository
    assert next(loaded.parameters()).dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.parameters())
    images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [-1, 1]
    latents = EffnetLatentEncoder(loaded, image_size=96).encode(images)
    with torch.no_grad():
        direct = reference(imagenet_normalise(images))  # the original module, never saved or loaded
    assert latents.shape == (2, 16, 3, 3)
    torch.testing.assert_close(latents, direct, rtol=1e-5, atol=1e-5)
    # ImageNet normalisation of [0, 1] pixels: (x - mean) / std channel by channel.
    by_hand = ((images[:, 0] + 1) / 2 - 0.485) / 0.229
    torch.testing.assert_close(imagenet_normalise(images)[:, 0], by_hand)


def test_bf16_load_keeps_the_integer_step_counter(saved_encoder) -> None:
    _, folder = saved_encoder
    loaded = load_effnet_encoder(folder / EFFNET_FILE, dtype=torch.bfloat16)
    state = loaded.state_dict()
    assert state["mapper.0.weight"].dtype == torch.bfloat16
    assert state["mapper.1.running_var"].dtype == torch.bfloat16
    assert state["mapper.1.num_batches_tracked"].dtype == torch.long
    latents = EffnetLatentEncoder(loaded, image_size=64).encode(torch.zeros(1, 3, 64, 64))
    assert latents.dtype == torch.bfloat16 and latents.shape == (1, 16, 2, 2)


def test_wrong_files_are_refused_with_the_keys_named(saved_encoder, tmp_path) -> None:
    reference, _ = saved_encoder
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    renamed = {k.replace("backbone.", "features.", 1): v for k, v in state.items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match="missing.*backbone"):
        load_effnet_encoder(tmp_path / "renamed.safetensors")
    wrong_width = {**state, "mapper.0.weight": torch.zeros(4, 1280, 1, 1)}
    save_file(wrong_width, tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match="wrong shapes.*mapper.0.weight"):
        load_effnet_encoder(tmp_path / "narrow.safetensors")
    torch.save(state, tmp_path / "effnet.pth")
    with pytest.raises(ValueError, match="safetensors only"):
        load_effnet_encoder(tmp_path / "effnet.pth")
    with pytest.raises(FileNotFoundError):
        load_effnet_encoder(tmp_path / "absent.safetensors")


def _jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_precompute_encodes_pairs_of_any_size_with_the_real_encoder(saved_encoder) -> None:
    _, folder = saved_encoder
    # latent_size 2 -> 64 px inputs (the real preset: 24 -> 768 px); the code path is the precompute job's.
    cfg = ModelConfig(architecture="stage_c_lite", effnet_path=str(folder), latent_size=2)
    encoder = load_latent_encoder(cfg, device="cpu")
    assert isinstance(encoder, EffnetLatentEncoder) and encoder.image_size == 64 and encoder.resize
    jpg_0 = [_jpeg(96, 80, 0), _jpeg(64, 64, 1)]
    jpg_1 = [_jpeg(120, 64, 2), b"not an image"]
    latents = encode_pairs(jpg_0, jpg_1, preferred=[1, 0], encoder=encoder)
    assert latents.kept.tolist() == [True, False]
    assert latents.latents_win.shape == (1, 16, 2, 2) and latents.latents_win.dtype == torch.float32
    assert not torch.equal(latents.latents_win, latents.latents_lose)
