"""Stage C latents <-> pixels: the lossless toy codec (toy world) and the Stage B + Stage A decoder (real models).

Both decoders expose `clamp_x0` (whether the Stage C sampler may clamp its x̂₀ to [-1, 1]) and
`to_images(latents, clip_text_pooled, generators) -> [B, 3, H, W] in [0, 1]`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

from ppd.models.schedule import denoise

# Stable Cascade's ratio between Stage B and Stage C latent sides (24 -> 256 for 1024 px), from its decoder pipeline.
STAGE_C_TO_STAGE_B_SCALE = 10.67


class ToyCodec:
    """Lossless toy "autoencoder": RGB in [-1, 1] [B, 3, H, W] <-> pixel-unshuffled latents [B, 3f², H/f, W/f].

    The factor f follows the Stage C it feeds (`for_stage_c`: in_channels = 3f²); 2 for the toy base (12 channels).
    """

    # The latents are a permutation of pixels in [-1, 1], so clamping x̂₀ to that range is exact, not a heuristic.
    clamp_x0 = True

    def __init__(self, factor: int = 2) -> None:
        self.factor = factor
        self.latent_channels = 3 * factor**2

    @classmethod
    def for_stage_c(cls, unet_config) -> ToyCodec:
        """The codec whose latents a Stage C with this config reads (in_channels = 3 f²)."""
        factor = math.isqrt(unet_config.in_channels // 3) if hasattr(unet_config, "in_channels") else 0
        if factor < 1 or 3 * factor**2 != unet_config.in_channels:
            raise ValueError(f"a toy Stage C needs 3·f² input channels, not {unet_config.in_channels}")
        return cls(factor)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """Latent [C, H, W] of a square image of side `image_size`."""
        if image_size % self.factor:
            raise ValueError(f"image side {image_size} is not a multiple of {self.factor}")
        side = image_size // self.factor
        return (self.latent_channels, side, side)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 3f², H/f, W/f] (a rearrangement: exactly invertible)."""
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 3f², h, w] -> [B, 3, fh, fw] in the latents' range (inverse of `encode`)."""
        return F.pixel_shuffle(latents, self.factor)

    def to_images(
        self,
        latents: torch.Tensor,
        clip_text_pooled: torch.Tensor | None = None,
        generators: list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Decode to [B, 3, H, W] in [0, 1]; text and generators are unused (the codec is deterministic)."""
        return ((self.decode(latents.float()) + 1) / 2).clamp(0, 1)


class StageBADecoder:
    """Stage C latents -> pixels as Stable Cascade does it: Stage B diffusion conditioned on them, then Stage A."""

    # Stage C latents are EfficientNet features without a fixed range: clamping x̂₀ would distort them.
    clamp_x0 = False

    def __init__(
        self,
        stage_b: StableCascadeUNet,
        stage_a: PaellaVQModel,
        latent_dim_scale: float = STAGE_C_TO_STAGE_B_SCALE,
        steps: int = 10,
    ) -> None:
        self.stage_b = stage_b.eval().requires_grad_(False)
        self.stage_a = stage_a.eval().requires_grad_(False)
        self.latent_dim_scale = latent_dim_scale
        self.steps = steps

    @torch.no_grad()
    def to_images(
        self,
        latents: torch.Tensor,
        clip_text_pooled: torch.Tensor | None = None,
        generators: list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Run Stage B (no guidance, as Stable Cascade's decoder default) on Stage C latents, decode with Stage A."""
        if clip_text_pooled is None or generators is None:
            raise ValueError("Stage B needs the pooled caption embedding [B, 1, C] and one generator per row")
        dtype = self.stage_b.dtype
        batch, _, height, width = latents.shape
        shape = (
            batch,
            self.stage_b.config.in_channels,
            int(height * self.latent_dim_scale),
            int(width * self.latent_dim_scale),
        )
        effnet = latents.to(dtype)  # [B, C_c, h, w]: Stage B resizes it to its own grid
        pooled = clip_text_pooled.to(dtype)  # [B, 1, C_t]

        def predict_noise(noisy: torch.Tensor, timestep_ratio: torch.Tensor) -> torch.Tensor:
            return self.stage_b(
                sample=noisy, timestep_ratio=timestep_ratio.to(dtype), clip_text_pooled=pooled, effnet=effnet
            ).sample

        stage_b_latents = denoise(
            predict_noise, shape, generators, self.steps, dtype=dtype, device=latents.device, clamp_x0=False
        )
        scaled = stage_b_latents * self.stage_a.config.scale_factor
        return self.stage_a.decode(scaled).sample.float().clamp(0, 1)
