"""The decoupled user adapter (paper Eq. 7, IP-Adapter style) on every attention block of a frozen Stage C.

In each `SDCascadeAttnBlock`:

    out = to_out( softmax(Q Kᵀ/√d) V  +  s · softmax(Q K'ᵀ/√d) V' ),   K' = U W'_k,  V' = U W'_v

Q, K, V and to_out are the block's own (frozen); U are the user tokens, made from the user embedding [L, d] by
`UserTokenProjection`; only W'_k, W'_v (per block) and the projection are trained.

The user tokens reach the attention processors through an explicit channel, `UserAdapter.user_condition(...)`;
outside that context (or with s = 0) every block computes exactly what the base model computes, which is what the
DPO reference uses, so no second copy of the network is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import StableCascadeUNet
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ppd.models.stage_c import attention_blocks


class AdapterConfig(BaseModel):
    """Shape and init of a user adapter; stored in every adapter checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_layers: int = Field(ge=1, description="L: layers (or tokens) of the user embedding [L, d]")
    embedding_dim: int = Field(ge=1, description="d: width of the user embedding")
    user_tokens: int = Field(ge=1, description="T_u: user tokens the embedding is projected to")
    conditioning_dim: int = Field(ge=1, description="c_cond: width of the user tokens (the UNet's conditioning width)")
    init: Literal["zero_value", "copy_text_kv"] = Field("zero_value", description="init of W'_k, W'_v")


class UserTokenProjection(nn.Module):
    """User embedding [B, L, d] -> user tokens [B, T_u, c_cond].

    Each token mixes the L layers with its own softmax weights (uniform at init), maps the mix d -> c_cond with
    its own linear map, and is layer-normed like the UNet's text tokens. A zero embedding maps to LayerNorm(bias):
    the learned "unconditional user" that user dropout trains.
    """

    def __init__(self, embedding_layers: int, embedding_dim: int, user_tokens: int, conditioning_dim: int) -> None:
        super().__init__()
        # With one layer the softmax is constantly 1: no mixing weights (they would never receive a gradient).
        self.layer_mix_logits = (
            nn.Parameter(torch.zeros(user_tokens, embedding_layers)) if embedding_layers > 1 else None
        )
        self.weight = nn.Parameter(torch.randn(user_tokens, embedding_dim, conditioning_dim) * embedding_dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(user_tokens, conditioning_dim))
        self.norm = nn.LayerNorm(conditioning_dim)
        self.user_tokens = user_tokens

    def forward(self, user_embedding: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B, T_u, c_cond]."""
        if self.layer_mix_logits is None:
            mixed = user_embedding.expand(-1, self.user_tokens, -1)  # [B, T_u, d]
        else:
            layer_weights = self.layer_mix_logits.softmax(dim=-1)  # [T_u, L]
            mixed = torch.einsum("tl,bld->btd", layer_weights, user_embedding)  # [B, T_u, d]
        tokens = torch.einsum("btd,tdc->btc", mixed, self.weight) + self.bias  # [B, T_u, c_cond]
        return self.norm(tokens)


class UserKeyValue(nn.Module):
    """W'_k and W'_v of one attention block: user tokens [B, T_u, c_cond] -> keys / values [B, T_u, c]."""

    def __init__(self, conditioning_dim: int, width: int) -> None:
        super().__init__()
        # No bias, as IP-Adapter's to_k_ip / to_v_ip: the paper's K' = U W'_k, V' = U W'_v.
        self.to_k = nn.Linear(conditioning_dim, width, bias=False)
        self.to_v = nn.Linear(conditioning_dim, width, bias=False)


@dataclass(frozen=True)
class UserCondition:
    """What the attention processors read while a `user_condition` context is open."""

    user_tokens: torch.Tensor  # [B, T_u, c_cond]
    scale: torch.Tensor  # [B]


def _block_key(module_path: str) -> str:
    # nn.ModuleDict keys may not contain dots: "down_blocks.0.2" -> "down_blocks_0_2".
    return module_path.replace(".", "_")


class UserAdapter(nn.Module):
    """All trainable parameters of PPD: the user-token projection and W'_k, W'_v of every attention block."""

    def __init__(self, config: AdapterConfig, unet: StableCascadeUNet) -> None:
        super().__init__()
        if config.conditioning_dim != unet.config.conditioning_dim:
            raise ValueError(
                f"adapter conditioning_dim {config.conditioning_dim} != Stage C conditioning_dim "
                f"{unet.config.conditioning_dim}"
            )
        self.config = config
        self.projection = UserTokenProjection(
            config.embedding_layers, config.embedding_dim, config.user_tokens, config.conditioning_dim
        )
        blocks = attention_blocks(unet)
        if not blocks:
            raise ValueError("this UNet has no SDCascadeAttnBlock to attach a user branch to")
        self.user_kv = nn.ModuleDict(
            {
                _block_key(path): UserKeyValue(config.conditioning_dim, block.attention.inner_dim)
                for path, block in blocks
            }
        )
        self._condition: UserCondition | None = None
        self._init_key_value(blocks)

    @torch.no_grad()
    def _init_key_value(self, blocks: list) -> None:
        for path, block in blocks:
            user_kv = self.user_kv[_block_key(path)]
            if self.config.init == "zero_value":
                # V' = 0: the branch adds exactly nothing, so training starts at the base model (= the reference);
                # W'_v gets a gradient at once, W'_k (default Linear init) from the second step on.
                nn.init.zeros_(user_kv.to_v.weight)
            else:
                # copy_text_kv: the text path is to_k(kv_mapper(c)) with kv_mapper = SiLU -> Linear(c_cond, c).
                # Compose the two linear maps into W'_k = W_k · W_map (works for any c_cond; SiLU and biases dropped),
                # so user tokens start being read like text tokens. The branch is then non-zero from step one.
                mapper = block.kv_mapper[1].weight  # [c, c_cond]
                user_kv.to_k.weight.copy_(block.attention.to_k.weight @ mapper)
                user_kv.to_v.weight.copy_(block.attention.to_v.weight @ mapper)

    def attach(self, unet: StableCascadeUNet) -> None:
        """Install the user-branch processor on every attention block of `unet` (the one the adapter was built for)."""
        blocks = attention_blocks(unet)
        if sorted(_block_key(path) for path, _ in blocks) != sorted(self.user_kv.keys()):
            raise ValueError("this adapter was built for a different Stage C (attention blocks differ)")
        for path, block in blocks:
            _check_supported(block.attention, path)
            block.attention.set_processor(UserAttnProcessor(self, _block_key(path)))

    def project(self, user_embedding: torch.Tensor) -> torch.Tensor:
        """User embedding [B, L, d] -> user tokens [B, T_u, c_cond]."""
        expected = (self.config.embedding_layers, self.config.embedding_dim)
        if user_embedding.dim() != 3 or tuple(user_embedding.shape[1:]) != expected:
            raise ValueError(
                f"user embedding must be [B, {expected[0]}, {expected[1]}], got {list(user_embedding.shape)}"
            )
        return self.projection(user_embedding.to(self.projection.weight.dtype))

    @contextmanager
    def user_condition(self, user_tokens: torch.Tensor, scale: float | torch.Tensor = 1.0) -> Iterator[None]:
        """Within this context every attention block adds the user branch for these tokens [B, T_u, c_cond].

        `scale` is s: a float for the whole batch or a tensor [B] (one s per row, e.g. requests of different users).
        """
        if self._condition is not None:
            raise RuntimeError("user_condition contexts do not nest")
        batch = user_tokens.shape[0]
        scale_per_row = torch.as_tensor(scale, dtype=user_tokens.dtype, device=user_tokens.device).expand(batch)
        self._condition = UserCondition(user_tokens=user_tokens, scale=scale_per_row)
        try:
            yield
        finally:
            self._condition = None

    @property
    def active_condition(self) -> UserCondition | None:
        """The condition of the open `user_condition` context, or None (then the blocks are the base model's)."""
        return self._condition

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters split into W'_k, W'_v and the user-token projection."""
        return {
            "w_k": sum(kv.to_k.weight.numel() for kv in self.user_kv.values()),
            "w_v": sum(kv.to_v.weight.numel() for kv in self.user_kv.values()),
            "user_projection": sum(p.numel() for p in self.projection.parameters()),
        }


def _check_supported(attention: Attention, path: str) -> None:
    # UserAttnProcessor re-implements AttnProcessor2_0 for the features SDCascadeAttnBlock uses; anything else
    # (another processor, spatial/group norms, masks) would make "adapter off == base" silently false.
    if not isinstance(attention.processor, (AttnProcessor2_0, UserAttnProcessor)):
        raise TypeError(f"{path}: expected AttnProcessor2_0, found {type(attention.processor).__name__}")
    if attention.spatial_norm is not None or attention.group_norm is not None or attention.norm_cross:
        raise TypeError(f"{path}: attention with spatial/group/cross norms is not supported by the user branch")
    if attention.norm_q is not None or attention.norm_k is not None:
        raise TypeError(f"{path}: attention with q/k norms is not supported by the user branch")


class UserAttnProcessor:
    """AttnProcessor2_0 plus the decoupled user branch; adds nothing while no user condition is active.

    A plain object, not an nn.Module: the weights live in the `UserAdapter`, so the base UNet's state dict stays
    exactly the pretrained one.
    """

    def __init__(self, adapter: UserAdapter, block_key: str) -> None:
        self.adapter = adapter
        self.block_key = block_key

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("attention masks are not used by Stage C and not supported by the user branch")
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape  # SDCascadeAttnBlock passes norm(x) as [B, c, H, W]
        queries_in = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # [B, HW, c]
        context = queries_in if encoder_hidden_states is None else encoder_hidden_states  # [B, HW + S, c]

        query = attn.to_q(queries_in)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def split_heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, heads, tokens, head_dim]

        query = split_heads(query)
        attended = F.scaled_dot_product_attention(
            query, split_heads(key), split_heads(value), dropout_p=0.0, is_causal=False
        )  # [B, heads, HW, head_dim]

        condition = self.adapter.active_condition
        if condition is not None:
            if condition.user_tokens.shape[0] != batch:
                raise ValueError(f"user tokens for {condition.user_tokens.shape[0]} rows, UNet batch is {batch}")
            user_kv = self.adapter.user_kv[self.block_key]
            user_tokens = condition.user_tokens.to(query.dtype)  # [B, T_u, c_cond]
            user_attended = F.scaled_dot_product_attention(
                query, split_heads(user_kv.to_k(user_tokens)), split_heads(user_kv.to_v(user_tokens))
            )  # [B, heads, HW, head_dim]
            attended = attended + condition.scale.to(query.dtype).view(batch, 1, 1, 1) * user_attended

        out = attended.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # [B, HW, c]
        out = attn.to_out[1](attn.to_out[0](out))  # the block's own output projection (and its dropout)
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PersonalizedStageC(nn.Module):
    """A frozen Stage C with a user adapter: `forward(..., user_embedding=None)` is exactly the base model."""

    def __init__(self, base: StableCascadeUNet, adapter: UserAdapter) -> None:
        super().__init__()
        base.requires_grad_(False)
        self.base = base.eval()
        self.adapter = adapter
        adapter.attach(base)

    def train(self, mode: bool = True) -> PersonalizedStageC:
        """Set the adapter's mode; the base stays in eval mode."""
        # The frozen base never runs dropout: policy and reference must see the same base function, and the
        # reference (adapter off) must be the pretrained model itself.
        super().train(mode)
        self.base.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters (everything else is frozen)."""
        return [p for p in self.adapter.parameters() if p.requires_grad]

    def optimizer_groups(self, lr: float, projection_lr_scale: float = 1.0) -> list[dict]:
        """The adapter's parameters as optimiser groups: the user-token projection at `lr x projection_lr_scale`,
        W'_k and W'_v of every block at `lr` (one group when the scale is 1: the optimiser state's layout of every
        checkpoint written before the option existed, so those runs still resume)."""
        if projection_lr_scale == 1.0:
            return [{"params": self.trainable_parameters(), "lr": lr}]
        projection = [p for p in self.adapter.projection.parameters() if p.requires_grad]
        in_projection = {id(p) for p in projection}
        key_value = [p for p in self.trainable_parameters() if id(p) not in in_projection]
        return [{"params": key_value, "lr": lr}, {"params": projection, "lr": lr * projection_lr_scale}]

    def forward(
        self,
        sample: torch.Tensor,
        timestep_ratio: torch.Tensor,
        clip_text_pooled: torch.Tensor,
        clip_text: torch.Tensor,
        user_embedding: torch.Tensor | None = None,
        user_scale: float | torch.Tensor = 1.0,
        clip_img: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted noise [B, C, H, W]; user_embedding [B, L, d] or None (adapter off = the base model).

        sample [B, C, H, W], timestep_ratio [B] in [0, 1], clip_text_pooled [B, 1, C_t], clip_text [B, S, C_t],
        user_scale s as a float or [B], clip_img [B, 1, C_img] (zeros when None: Stage C only reads the text when
        both clip_text and clip_img are given).
        """
        dtype = self.base.dtype
        if clip_img is None:
            clip_img = sample.new_zeros(sample.shape[0], 1, self.base.config.clip_image_in_channels, dtype=dtype)

        def run_base() -> torch.Tensor:
            return self.base(
                sample=sample.to(dtype),
                timestep_ratio=timestep_ratio.to(dtype),
                clip_text_pooled=clip_text_pooled.to(dtype),
                clip_text=clip_text.to(dtype),
                clip_img=clip_img.to(dtype),
                return_dict=False,
            )[0]

        if user_embedding is None:
            return run_base()
        if self.base.gradient_checkpointing and torch.is_grad_enabled():
            # Recomputation during backward runs after the user_condition context has closed.
            raise NotImplementedError("gradient checkpointing of the base UNet is not supported with the user branch")
        user_tokens = self.adapter.project(user_embedding)  # [B, T_u, c_cond]
        with self.adapter.user_condition(user_tokens, user_scale):
            return run_base()
