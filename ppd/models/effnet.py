"""Stable Cascade's latent encoder ("effnet"): RGB images -> the 16-channel Stage C latents the real prior was trained on.

The module is the one of Stability's training code, with its state-dict layout, so that `effnet_encoder.safetensors`
(root of the `stabilityai/stable-cascade` repository) loads key for key:

    backbone.*   torchvision `efficientnet_v2_s().features` (1280 channels at 1/32 of the input side)
    mapper.0     Conv2d(1280, 16, 1x1, no bias)
    mapper.1     BatchNorm2d(16, affine=False): running mean / variance only, so the latents come out standardised

Inputs are RGB in [0, 1] with ImageNet normalisation (Stable Cascade's `effnet_preprocess`); Stage C's training
images were brought to 768 px (shorter side, then a crop), so 768 px -> 16 x 24 x 24, the latent grid of 1024 px
generation. Weights are read from safetensors only; a file whose keys or shapes differ is refused with the keys named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ppd.embed.torchvision_compat import ensure_torchvision_importable

EFFNET_FILE = "effnet_encoder.safetensors"
EFFNET_REPO = "stabilityai/stable-cascade"  # where EFFNET_FILE lives (repository root)
EFFNET_IMAGE_SIZE = 768  # px: Stage C's training resolution -> 24 x 24 latents
EFFNET_FEATURES = 1280  # channels of efficientnet_v2_s().features
EFFNET_LATENT_CHANNELS = 16  # Stage C in_channels
EFFNET_DOWNSAMPLING = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# BatchNorm's step counter is in the module's state dict but not needed to run it (eval mode reads the running
# statistics only); a checkpoint may carry it or not.
_OPTIONAL_KEYS = {"mapper.1.num_batches_tracked"}


class EfficientNetEncoder(nn.Module):
    """EfficientNetV2-S features + a 1x1 projection to 16 channels + non-affine BatchNorm (Stable Cascade's effnet)."""

    def __init__(self, latent_channels: int = EFFNET_LATENT_CHANNELS) -> None:
        super().__init__()
        ensure_torchvision_importable()
        from torchvision.models import efficientnet_v2_s

        self.backbone = efficientnet_v2_s(weights=None).features  # weights=None: built here, never downloaded
        self.mapper = nn.Sequential(
            nn.Conv2d(EFFNET_FEATURES, latent_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(latent_channels, affine=False),
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised RGB [B, 3, H, W] -> latents [B, 16, H/32, W/32]."""
        return self.mapper(self.backbone(pixels))


def imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    """RGB in [-1, 1] [B, 3, H, W] -> [0, 1] -> ImageNet mean/std normalisation (Stable Cascade's effnet_preprocess)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def effnet_weights_file(location: str | Path | None) -> Path:
    """The safetensors file named by `location`: a file, a folder holding effnet_encoder.safetensors, or a hub repo id
    (None = stabilityai/stable-cascade), downloaded into the Hugging Face cache on first use."""
    location = str(location or EFFNET_REPO)
    path = Path(location)
    if path.is_file():
        return path
    if path.is_dir():
        return path / EFFNET_FILE
    if location.startswith((".", "/")) or location.endswith(".safetensors"):
        raise FileNotFoundError(f"EfficientNet encoder weights {location} do not exist")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(location, EFFNET_FILE))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise FileNotFoundError(
            f"cannot fetch {EFFNET_FILE} of {location} ({type(err).__name__}; offline, or a gated repo without "
            "HF_TOKEN?): download it once and set model.effnet_path to the file"
        ) from None


def load_effnet_encoder(
    location: str | Path | None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> EfficientNetEncoder:
    """The encoder with the weights of `location` (see `effnet_weights_file`), in eval mode and frozen.

    The module is built on the meta device and takes the file's tensors as they are (no random init of 20M
    parameters first); missing, unexpected or wrongly shaped tensors raise ValueError naming them.
    """
    path = effnet_weights_file(location)
    if path.suffix != ".safetensors":
        raise ValueError(f"refusing to load {path}: EfficientNet weights are read from .safetensors only")
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet encoder weights {path} do not exist")
    with torch.device("meta"):
        encoder = EfficientNetEncoder()
    expected = {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}
    try:
        with safe_open(str(path), "pt", device="cpu") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read EfficientNet weights {path}: {err}") from None
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    missing = sorted(expected.keys() - found.keys() - _OPTIONAL_KEYS)
    unexpected = sorted(found.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} is not Stable Cascade's EfficientNet encoder: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), "
            f"wrong shapes {[f'{k}: {found[k]} != {expected[k]}' for k in wrong[:5]]}"
        )
    for name in _OPTIONAL_KEYS - found.keys():
        state[name] = torch.zeros((), dtype=torch.long)
    # Weights in the requested dtype; BatchNorm's integer step counter stays an integer.
    state = {name: tensor if not tensor.is_floating_point() else tensor.to(dtype) for name, tensor in state.items()}
    encoder.load_state_dict(state, assign=True)
    return encoder.to(device).eval().requires_grad_(False)


@dataclass
class EffnetLatentEncoder:
    """`ppd.train.precompute.LatentEncoder` of the real Stage C: RGB in [-1, 1] at 768 px -> 16 x 24 x 24 latents."""

    encoder: EfficientNetEncoder
    image_size: int = EFFNET_IMAGE_SIZE
    resize: bool = True  # Pick-a-Pic images come in many sizes: shorter side to image_size, then a centre crop

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] (any device) -> latents [B, 16, S/32, S/32] in the encoder's dtype, on its device."""
        pixels = imagenet_normalise(images.to(self.device, torch.float32)).to(self.dtype)  # [B, 3, S, S]
        return self.encoder(pixels)  # [B, 16, S/32, S/32]
