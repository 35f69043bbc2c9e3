"""Test-only oracle: upstream Meissonic's ``Transformer2DModel`` rebuilt from diffusers' public classes.

Upstream (github.com/viiika/Meissonic, ``src/transformer.py``) composes its transformer from diffusers
building blocks. This module composes the same blocks independently (the forward is written here, not
copied) so that tests can

* write checkpoints in upstream's exact layout with ``save_pretrained`` (``config.json`` with
  ``_class_name: "Transformer2DModel"`` and ``diffusion_pytorch_model.safetensors``), and
* compute upstream's logits for the same weights and inputs, to compare with our reimplementation.

Building blocks used, as upstream does: ``RMSNorm`` (diffusers), ``TimestepEmbedding``,
``get_timestep_embedding``, ``CombinedTimestepTextProjEmbeddings`` (``...Guidance...`` when
``guidance_embeds``), ``Downsample2D`` / ``Upsample2D`` with ``norm_type="rms_norm"``, and the Flux blocks.

Upstream's own ``TransformerBlock`` / ``SingleTransformerBlock`` versus diffusers 0.42's
``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` (both read line by line):

* Same submodules, same names, same constructor arguments (``AdaLayerNormZero(dim)``, attention with
  added kv projections and ``context_pre_only=False``, ``bias=True``, RMS qk-norm with eps 1e-6,
  ``LayerNorm(dim, elementwise_affine=False, eps=1e-6)``, ``FeedForward(dim, dim_out=dim,
  activation_fn="gelu-approximate")``; single block: ``AdaLayerNormZeroSingle``, ``proj_mlp`` (4x),
  tanh-GELU, ``proj_out`` (5C -> C), ``pre_only=True`` attention), same forward maths.
* Upstream's attention is the generic ``diffusers.models.attention_processor.Attention`` whose qk-norms are
  diffusers' ``RMSNorm`` (variance in float32); diffusers 0.42's ``FluxAttention`` uses
  ``torch.nn.RMSNorm``. Same parameter (``weight``), same eps, same result in float32 (only rounding
  differs). ``tests/test_upstream_oracle.py`` checks keys and outputs of both constructions.
* In diffusers >= 0.35 ``FluxAttnProcessor2_0`` is a deprecated alias returning ``FluxAttnProcessor``,
  which reads ``attn.head_dim``; the generic ``Attention`` has no such attribute, so upstream's file as
  written fails at its first forward on diffusers 0.42 (AttributeError). The maths of the old and new
  processor are the same (projections, per-head RMS norm, [text; image] concatenation, rotary on q and k,
  SDPA with scale 1/sqrt(head_dim), split, ``to_out.0`` / ``to_add_out``), so this oracle uses the Flux
  blocks themselves.
* ``FluxSingleTransformerBlock`` in 0.42 takes text and image separately and concatenates [text; image]
  itself (upstream's single block takes the concatenation); the forward below keeps the two parts
  separate across the single blocks, which is the same computation.
* Upstream's own ``FluxPosEmbed`` computes the angles in float64 on the CPU and casts cos/sin to float32;
  diffusers' ``FluxPosEmbed`` does the same on the ids' device. The forward below runs it on CPU ids.

Expected state-dict keys (read from upstream's ``__init__``; C = heads * head_dim, Dt =
joint_attention_dim, Dp = pooled_projection_dim, V = vocab_size, K = codebook_size)::

    embed.embeddings.weight                              [V, C]
    embed.layer_norm.weight                              [C]
    embed.conv.weight                                    [C, C, 1, 1]       (no bias)
    cond_embed.linear_1.weight                           [C, Dp + 1280]     (no bias)
    cond_embed.linear_2.weight                           [C, C]             (no bias)
    time_text_embed.timestep_embedder.linear_1.weight    [C, 256]   + .bias [C]
    time_text_embed.timestep_embedder.linear_2.weight    [C, C]     + .bias [C]
    time_text_embed.guidance_embedder.linear_{1,2}.*     (only if guidance_embeds; same shapes)
    time_text_embed.text_embedder.linear_1.weight        [C, Dp]    + .bias [C]
    time_text_embed.text_embedder.linear_2.weight        [C, C]     + .bias [C]
    context_embedder.weight                              [C, Dt]    + .bias [C]
    encoder_proj_layer_norm.weight                       [C]
    down_block.downsample.norm.weight                    [C]                (only if downsample)
    down_block.downsample.conv.weight                    [C, C, 2, 2]       (only if downsample; no bias)
    project_to_hidden_norm.weight                        [C]
    project_to_hidden.weight                             [C, C]             (no bias)
    transformer_blocks.{i}.<double-block keys>           i < num_layers
    single_transformer_blocks.{i}.<single-block keys>    i < num_single_layers
    project_from_hidden_norm.weight                      [C]
    project_from_hidden.weight                           [C, C]             (no bias)
    up_block.upsample.norm.weight                        [C]                (only if upsample)
    up_block.upsample.conv.weight                        [C, C, 2, 2]       (if upsample; transposed; no bias)
    mlm_layer.conv1.weight                               [C, C, 1, 1]       (no bias)
    mlm_layer.layer_norm.weight                          [C]
    mlm_layer.conv2.weight                               [K, C, 1, 1]       (no bias)

Double-block keys (every Linear has a bias; d = head_dim)::

    norm1.linear.{weight [6C, C], bias [6C]}
    norm1_context.linear.{weight [6C, C], bias [6C]}
    attn.to_q.{weight, bias}  attn.to_k.{weight, bias}  attn.to_v.{weight, bias}        [C, C], [C]
    attn.norm_q.weight [d]  attn.norm_k.weight [d]
    attn.add_q_proj.{weight, bias}  attn.add_k_proj.{weight, bias}  attn.add_v_proj.{weight, bias}
    attn.norm_added_q.weight [d]  attn.norm_added_k.weight [d]
    attn.to_out.0.{weight, bias}  attn.to_add_out.{weight, bias}                         [C, C], [C]
    ff.net.0.proj.{weight [4C, C], bias [4C]}  ff.net.2.{weight [C, 4C], bias [C]}
    ff_context.net.0.proj.{weight, bias}  ff_context.net.2.{weight, bias}               (as ff)

Single-block keys::

    norm.linear.{weight [3C, C], bias [3C]}
    proj_mlp.{weight [4C, C], bias [4C]}
    proj_out.{weight [C, 5C], bias [C]}
    attn.to_q.{weight, bias}  attn.to_k.{weight, bias}  attn.to_v.{weight, bias}        [C, C], [C]
    attn.norm_q.weight [d]  attn.norm_k.weight [d]

Note that upstream's forward feeds the output of ``cond_embed`` (width C) to ``text_embedder``, whose input
width is ``pooled_projection_dim``, so a working config needs ``pooled_projection_dim == C``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import (
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
    TimestepEmbedding,
    get_timestep_embedding,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import (
    FluxPosEmbed,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from diffusers.models.upsampling import Upsample2D

__all__ = [
    "TINY_CONFIG",
    "Transformer2DModel",
    "make_img_ids",
    "random_upstream_model",
    "txt_ids",
    "upstream_logits",
]

# Upstream's fixed choices inside Transformer2DModel.__init__ / forward.
_EPS = 1e-6
_MICRO_COND_WIDTH = 256  # per micro-condition; 5 of them -> 1280
_MICRO_COND_EMBED_DIM = 1280

TINY_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=32,  # must equal heads * head_dim (see the module docstring)
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
    vocab_size=72,
    codebook_size=64,
    downsample=True,
    upsample=True,
)


class _TokenEmbed(nn.Module):
    """``embed``: token embedding -> RMSNorm -> channels-first -> 1x1 conv (no bias)."""

    def __init__(self, vocab_size: int, channels: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, channels)
        self.layer_norm = RMSNorm(channels, _EPS, elementwise_affine=True)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, h, w] -> [B, C, h, w]
        x = self.layer_norm(self.embeddings(tokens))
        return self.conv(x.permute(0, 3, 1, 2))


class _LogitsHead(nn.Module):
    """``mlm_layer``: 1x1 conv -> RMSNorm over channels -> 1x1 conv to the codebook (no biases)."""

    def __init__(self, channels: int, codebook_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(channels, _EPS, elementwise_affine=True)
        self.conv2 = nn.Conv2d(channels, codebook_size, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] -> [B, K, h, w]
        x = self.conv1(x)
        x = self.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(x)


class _Resample(nn.Module):
    """``down_block`` / ``up_block``: holds ``downsample`` and ``upsample`` (each a module or None)."""

    def __init__(self, channels: int, downsample: bool, upsample: bool):
        super().__init__()
        self.downsample = None
        self.upsample = None
        if downsample:
            # name="Conv2d_0" registers the conv only as `conv` (name="conv" would add a `Conv2d_0` alias).
            self.downsample = Downsample2D(
                channels,
                use_conv=True,
                padding=0,
                name="Conv2d_0",
                kernel_size=2,
                norm_type="rms_norm",
                eps=_EPS,
                elementwise_affine=True,
                bias=False,
            )
        if upsample:
            self.upsample = Upsample2D(
                channels,
                use_conv_transpose=True,
                kernel_size=2,
                padding=0,
                name="conv",
                norm_type="rms_norm",
                eps=_EPS,
                elementwise_affine=True,
                bias=False,
                interpolate=False,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Transformer2DModel(ModelMixin, ConfigMixin):
    """Replica of upstream Meissonic's ``Transformer2DModel`` (same config, state dict and forward)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, ...] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        downsample: bool = False,
        upsample: bool = False,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.out_channels = in_channels  # unused, as upstream

        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=list(axes_dims_rope))  # no parameters
        time_text_cls = (
            CombinedTimestepGuidanceTextProjEmbeddings if guidance_embeds else CombinedTimestepTextProjEmbeddings
        )
        self.time_text_embed = time_text_cls(embedding_dim=dim, pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [
                FluxTransformerBlock(
                    dim=dim, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim
                )
                for _ in range(num_layers)
            ]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [
                FluxSingleTransformerBlock(
                    dim=dim, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim
                )
                for _ in range(num_single_layers)
            ]
        )

        self.embed = _TokenEmbed(vocab_size, dim)
        self.mlm_layer = _LogitsHead(dim, codebook_size)
        self.cond_embed = TimestepEmbedding(_MICRO_COND_EMBED_DIM + pooled_projection_dim, dim, sample_proj_bias=False)
        self.encoder_proj_layer_norm = RMSNorm(dim, _EPS, elementwise_affine=True)
        self.project_to_hidden_norm = RMSNorm(dim, _EPS, elementwise_affine=True)
        self.project_to_hidden = nn.Linear(dim, dim, bias=False)
        self.project_from_hidden_norm = RMSNorm(dim, _EPS, elementwise_affine=True)
        self.project_from_hidden = nn.Linear(dim, dim, bias=False)
        self.down_block = _Resample(dim, downsample=downsample, upsample=False)
        self.up_block = _Resample(dim, downsample=False, upsample=upsample)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        micro_conds: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upstream's forward (no LoRA / controlnet / gradient checkpointing).

        hidden_states: int tokens [B, h, w]; encoder_hidden_states [B, T, Dt]; pooled_projections [B, Dp];
        timestep [B] or [1] (multiplied by 1000 here); img_ids [h'w', 3] for the grid the blocks see;
        txt_ids [T, 3]; micro_conds [B, 5]. Returns logits [B, codebook_size, h, w].
        """
        batch = hidden_states.shape[0]

        # Micro-conditions: 5 x 256 sinusoids after the pooled text embedding -> cond_embed (width C).
        micro = get_timestep_embedding(
            micro_conds.flatten(), _MICRO_COND_WIDTH, flip_sin_to_cos=True, downscale_freq_shift=0
        ).reshape(batch, -1)
        cond = torch.cat([pooled_projections, micro], dim=1).to(self.dtype)
        cond = self.cond_embed(cond).to(encoder_hidden_states.dtype)

        image = self.embed(hidden_states)
        text = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))
        image = self.down_block(image)
        _, channels, height, width = image.shape
        image = image.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        image = self.project_to_hidden(self.project_to_hidden_norm(image))

        t = timestep.to(image.dtype) * 1000
        if guidance is None:
            temb = self.time_text_embed(t, cond)
        else:
            temb = self.time_text_embed(t, guidance.to(image.dtype) * 1000, cond)

        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        ids = torch.cat([txt_ids, img_ids], dim=0)
        # float64 angles on the CPU, cos/sin cast to float32, like upstream's own FluxPosEmbed.
        cos, sin = self.pos_embed(ids.detach().to("cpu", torch.float32))
        rotary = (cos.to(image.device), sin.to(image.device))

        for block in self.transformer_blocks:
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
        for block in self.single_transformer_blocks:
            # The block attends over [text; image] and splits the result again.
            text, image = block(hidden_states=image, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)

        image = self.project_from_hidden(self.project_from_hidden_norm(image))
        image = image.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        image = self.up_block(image)
        return self.mlm_layer(image)


def make_img_ids(height: int, width: int) -> torch.Tensor:
    """Rotary ids of an image grid: one row (0, row, col) per token, row-major; float32 [height*width, 3]."""
    ids = torch.zeros(height, width, 3, dtype=torch.float32)
    ids[..., 1] = torch.arange(height, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(width, dtype=torch.float32)[None, :]
    return ids.reshape(height * width, 3)


def txt_ids(n: int = 77) -> torch.Tensor:
    """Rotary ids of the text tokens: all zeros, float32 [n, 3]."""
    return torch.zeros(n, 3, dtype=torch.float32)


@torch.no_grad()
def upstream_logits(
    model: Transformer2DModel,
    tokens: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    text_embeds: torch.Tensor,
    micro_conds: torch.Tensor,
    timestep: torch.Tensor,
) -> torch.Tensor:
    """Upstream's logits in our graph contract's layout: [B, h*w, codebook_size] (row-major positions).

    The image ids describe the grid the blocks see: (h/2, w/2) with downsampling, (h, w) without.
    """
    h, w = tokens.shape[-2:]
    grid = (h // 2, w // 2) if model.config.downsample else (h, w)
    logits = model(
        hidden_states=tokens,
        encoder_hidden_states=encoder_hidden_states,
        pooled_projections=text_embeds,
        timestep=timestep,
        img_ids=make_img_ids(*grid).to(encoder_hidden_states.device),
        txt_ids=txt_ids(encoder_hidden_states.shape[1]).to(encoder_hidden_states.device),
        micro_conds=micro_conds,
    )
    b, k = logits.shape[:2]
    return logits.permute(0, 2, 3, 1).reshape(b, -1, k)


# Output gain per (module path suffix) for the random weights; everything else gets gain 1.
_GAINS = {
    # adaptive-norm modulation (shift / scale / gate): keep 1 + scale and the gates moderate
    "norm1.linear": 0.5,
    "norm1_context.linear": 0.5,
    "norm.linear": 0.5,
    # logits of a few units
    "mlm_layer.conv2": 3.0,
}


def _gain(name: str) -> float:
    for suffix, gain in _GAINS.items():
        if name == suffix or name.endswith("." + suffix):
            return gain
    return 1.0


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    """Give every parameter a non-degenerate random value; deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)

    def randn(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)

    done: set[int] = set()
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        gain = _gain(name)
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            weight = module.weight
            if isinstance(module, nn.ConvTranspose2d):
                # kernel 2, stride 2: each output sees one tap of every input channel
                fan_in = weight.shape[0] * max(1, weight.shape[2] * weight.shape[3] // 4)
            else:
                fan_in = weight[0].numel()
            weight.copy_(randn(weight) * (gain / math.sqrt(fan_in)))
            if module.bias is not None:
                module.bias.copy_(0.1 * randn(module.bias))
        elif isinstance(module, nn.Embedding):
            module.weight.copy_(randn(module.weight))
        elif isinstance(module, (RMSNorm, nn.RMSNorm, nn.LayerNorm)):
            for p in params.values():
                p.copy_(1.0 + 0.1 * randn(p))
        else:
            raise TypeError(f"no random initialisation rule for {name} ({type(module).__name__})")
        done.update(id(p) for p in params.values())
    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise AssertionError(f"parameters left unperturbed: {missed}")


def random_upstream_model(seed: int = 0, **config) -> Transformer2DModel:
    """A small oracle with every parameter randomised (no zero/one tensors), in eval mode, float32.

    ``config`` overrides ``TINY_CONFIG``. The same seed and config give the same weights; the global
    torch RNG is left untouched.
    """
    cfg = {**TINY_CONFIG, **config}
    with torch.random.fork_rng(devices=[]):
        model = Transformer2DModel(**cfg)
    _randomize(model, seed)
    return model.eval()
