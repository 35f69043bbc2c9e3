"""Which layers int4 hurts most, measured: what a mixed-precision recipe keeps at 8 bits.

The measurement runs in PyTorch with simulated ("fake") quantization, which is what makes it take minutes
on a CPU rather than hours of export + quantize + onnxruntime per layer:

1. A short fp32 reference generation (default: 4 steps, guidance 9, 256x256, a few prompts) records, at
   every step, the token grid the transformer saw, the hidden states entering each block, and the guided
   logits the sampler drew from.
2. For each layer group (a double or single block, the embedding, the conditioning MLPs, ...) the weights of
   its layers are replaced by their int4 quantize -> dequantize, exactly as onnxruntime's MatMulNBits
   symmetric round-to-nearest stores them (`fake_quantize`); the forward is re-run from that group's first
   stage on the recorded inputs (earlier stages are unchanged, so their cached outputs are reused), and the
   weights are restored.
3. Damage = mean KL(p_fp32 || p_int4) of the softmax over the codebook (float64), and the top-1 agreement,
   over the positions still masked at each step: the tokens the sampler actually draws there.

`meissonic_edge.quant.recipe_writer` then turns the measurements into a mixed-precision recipe within a size
budget.

What the measurement leaves out: onnxruntime's int8 arithmetic on activations (accuracy_level 4), HQQ and
GPTQ (they quantize better than RTN; the ranking is what is used), and interactions between groups (the
"all groups int4" figure shows them in sum).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from meissonic_edge.errors import OptionsError
from meissonic_edge.model.transformer import (
    MICRO_COND_WIDTH,
    MeissonicTransformer,
    PointwiseConv,
    rotary_table,
    sinusoidal_embedding,
)
from meissonic_edge.runtime.config import VQ_STRIDE, TransformerConfig
from meissonic_edge.runtime.sampler import ROW_CHUNK, GenerationOptions, apply_guidance, sample

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "a red fox standing in fresh snow, morning light, photograph",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "a bowl of ramen with an egg and green onions, studio lighting",
)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits (and quantize.ComponentPrecision) accept
QUANTIZED_LAYERS = (nn.Linear, PointwiseConv, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)
ALL_GROUPS = "all groups"  # the name of the measurement with every group at int4 at once


# ----------------------------------------------------------------------------------------------- fake quantization


def fake_quantize(matrix: torch.Tensor, block_size: int = 32, bits: int = 4) -> torch.Tensor:
    """Quantize -> dequantize an (out, in) weight matrix the way onnxruntime's MatMulNBits symmetric RTN does.

    Blocks are `block_size` consecutive input-channel weights of one output row (in the ONNX graph, where
    the MatMul weight is (K, N), a block runs down one column along K); the last block of a row is padded
    with zeros. Each block's scale is its value of largest magnitude, *with its sign*, divided by
    -2^(bits-1): that value becomes the code -8 (for 4 bits) exactly, the codes run -8..7, and a value of
    the opposite sign and the same magnitude clips to 7. (Not absmax / 7 with codes -7..7.)
    """
    rows, cols = matrix.shape
    levels = 2 ** (bits - 1)
    blocks = nn.functional.pad(matrix.float(), (0, -cols % block_size)).reshape(rows, -1, block_size)
    extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # (rows, blocks, 1), signed
    scale = extreme / -levels
    codes = torch.where(scale == 0, 0.0, blocks / scale).round().clamp(-levels, levels - 1)
    return (codes * scale).reshape(rows, -1)[:, :cols].to(matrix.dtype)


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a layer multiplies by, as the exported graph's MatMul (transposed) sees it.

    For the embedding table, (vocab, C): its GatherBlockQuantized blocks run along C.
    """
    if isinstance(layer, nn.ConvTranspose2d):
        return layer.weight.permute(2, 3, 1, 0).flatten(0, 2)  # (2*2*Cout, Cin), as Upsample uses it
    return layer.weight.flatten(1)  # Linear (N, K); 1x1 conv (N, K, 1, 1); 2x2 conv (Cout, Cin*2*2); table


def set_weight_matrix(layer: nn.Module, matrix: torch.Tensor) -> None:
    """Write `matrix` (the layout of `weight_matrix`) back into the layer's weight."""
    weight = layer.weight
    if isinstance(layer, nn.ConvTranspose2d):
        cin, cout, kh, kw = weight.shape
        matrix = matrix.unflatten(0, (kh, kw, cout)).permute(3, 2, 0, 1)  # (Cin, Cout, kh, kw)
    with torch.no_grad():
        weight.copy_(matrix.reshape(weight.shape))


def quantize_layers(layers, block_size: int, keep: bool = True) -> list[torch.Tensor]:
    """Fake-quantize the weights of `layers` in place; return the originals (for `restore_layers`) if `keep`."""
    originals = []
    for layer in layers:
        if keep:
            originals.append(layer.weight.detach().clone())
        set_weight_matrix(layer, fake_quantize(weight_matrix(layer), block_size))
    return originals


def restore_layers(layers, originals: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for layer, weight in zip(layers, originals, strict=True):
            layer.weight.copy_(weight)


# ----------------------------------------------------------------------------------------------- layer groups


@dataclass(frozen=True)
class LayerGroup:
    """Layers quantized together, named by the top-level module paths they live under."""

    name: str
    prefixes: tuple[str, ...]  # top-level module paths the group owns (its parameters all live there)
    stage: int  # the first stage of `StagedForward` the group's weights take part in
    layers: tuple[nn.Module, ...] = field(repr=False)  # the layers whose weight matrices are quantized
    layer_paths: tuple[str, ...]  # their module paths
    params: int  # weights quantized: the matrices of `layers`
    float_params: int  # parameters that stay float: biases, norm weights

    @property
    def patterns(self) -> tuple[str, ...]:
        """fnmatch patterns over module paths (the exported node names' first part) that cover the group."""
        patterns = []
        for prefix in self.prefixes:
            if prefix in self.layer_paths:
                patterns.append(prefix)  # a layer at the top level: `/context_embedder/MatMul`
            elif any(path.startswith(prefix + ".") for path in self.layer_paths):
                patterns.append(prefix + ".*")
        return tuple(patterns)


def owns(prefix: str, path: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def layer_groups(model: MeissonicTransformer) -> list[LayerGroup]:
    """The groups, in the order the forward runs them; every parameter of the model is in exactly one.

    Works on a model on the meta device too (only shapes are read).
    """
    config = model.config
    head = 1 + config.num_layers + config.num_single_layers
    spec = [
        ("embed", ("embed",), 0),
        ("cond_embed+time_text_embed", ("cond_embed", "time_text_embed"), 0),
        ("context_embedder", ("context_embedder", "encoder_proj_layer_norm"), 0),
        ("down_block", ("down_block",), 0),
        ("project_to_hidden", ("project_to_hidden_norm", "project_to_hidden"), 0),
        *((f"transformer_blocks.{i}", (f"transformer_blocks.{i}",), 1 + i) for i in range(config.num_layers)),
        *(
            (f"single_transformer_blocks.{i}", (f"single_transformer_blocks.{i}",), 1 + config.num_layers + i)
            for i in range(config.num_single_layers)
        ),
        ("project_from_hidden", ("project_from_hidden_norm", "project_from_hidden"), head),
        ("up_block", ("up_block",), head),
        ("mlm_layer", ("mlm_layer",), head),
    ]
    layers = {path: m for path, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}
    parameters = dict(model.named_parameters())
    groups = []
    for name, prefixes, stage in spec:
        paths = tuple(p for p in layers if any(owns(prefix, p) for prefix in prefixes))
        if not paths:  # down_block / up_block of a model without feature compression
            continue
        quantized = {f"{p}.weight" for p in paths}
        owned = [k for k in parameters if any(owns(prefix, k) for prefix in prefixes)]
        groups.append(
            LayerGroup(
                name=name,
                prefixes=prefixes,
                stage=stage,
                layers=tuple(layers[p] for p in paths),
                layer_paths=paths,
                params=sum(parameters[k].numel() for k in owned if k in quantized),
                float_params=sum(parameters[k].numel() for k in owned if k not in quantized),
            )
        )
    return groups


# ----------------------------------------------------------------------------------------------- staged forward


@dataclass
class Activations:
    """What flows between stages of the forward."""

    x: torch.Tensor  # (B, h'*w', C) image stream; (B, 77 + h'*w', C) once the single blocks have joined it
    context: torch.Tensor | None  # (B, 77, C) text stream; None once joined
    temb: torch.Tensor  # (B, C)
    rope: tuple[torch.Tensor, torch.Tensor]
    grid: tuple[int, int]  # the token grid the blocks see
    text_len: int


class StagedForward:
    """`MeissonicTransformer.forward`, cut into stages so that a measurement re-runs only what changed.

    Stage 0 is everything before the blocks, then one stage per double block, one per single block, and
    the last stage is everything after them. Running all stages is the model's forward (checked by a test).
    """

    def __init__(self, model: MeissonicTransformer):
        self.model = model
        self.doubles = model.config.num_layers
        self.singles = model.config.num_single_layers
        self.count = 2 + self.doubles + self.singles

    def stem(self, tokens, encoder_hidden_states, text_embeds, micro_conds, timestep) -> Activations:
        m = self.model
        batch = tokens.shape[0]
        micro = sinusoidal_embedding(micro_conds.flatten(), MICRO_COND_WIDTH).reshape(batch, -1)  # (B, 1280)
        cond = m.cond_embed(torch.cat([text_embeds, micro.to(text_embeds.dtype)], dim=1))  # (B, C)
        temb = m.time_text_embed(timestep, cond)  # (B, C)
        context = m.encoder_proj_layer_norm(m.context_embedder(encoder_hidden_states))  # (B, 77, C)
        x = m.down_block(m.embed(tokens))  # (B, h', w', C)
        grid = (x.shape[1], x.shape[2])
        x = m.project_to_hidden(m.project_to_hidden_norm(x.flatten(1, 2)))  # (B, h'*w', C)
        rope = rotary_table(context.shape[1], *grid, m.config.axes_dims_rope, m.rope_dtype, tokens.device)
        return Activations(x, context, temb, rope, grid, context.shape[1])

    def stage(self, index: int, a: Activations) -> Activations:
        """Run stage `index` (>= 1) on the activations entering it."""
        m = self.model
        if index <= self.doubles:
            x, context = m.transformer_blocks[index - 1](a.x, a.context, a.temb, a.rope)
            return replace(a, x=x, context=context)
        if index <= self.doubles + self.singles:
            x = a.x if a.context is None else torch.cat([a.context, a.x], dim=1)  # (B, 77 + h'*w', C)
            x = m.single_transformer_blocks[index - 1 - self.doubles](x, a.temb, a.rope)
            return replace(a, x=x, context=None)
        x = a.x if a.context is not None else a.x[:, a.text_len :]  # (B, h'*w', C)
        x = m.project_from_hidden(m.project_from_hidden_norm(x))
        x = m.up_block(x.unflatten(1, a.grid))  # (B, h, w, C)
        return replace(a, x=m.mlm_layer(x.flatten(1, 2)), context=None)  # (B, h*w, codebook_size)

    def run(self, a: Activations, start: int = 1, keep: list | None = None) -> torch.Tensor:
        """Stages `start`.. on `a` (what enters stage `start`); `keep` collects what enters each stage."""
        for index in range(start, self.count):
            if keep is not None:
                keep.append(a)
            a = self.stage(index, a)
        return a.x


# ----------------------------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class GroupSensitivity:
    """How much int4 on one layer group (or on all at once) changes the sampler's distributions."""

    name: str  # the group: "transformer_blocks.3", "mlm_layer", ... or ALL_GROUPS
    patterns: tuple[str, ...]  # module-path patterns for a recipe's int8_layers
    params: int  # weights quantized
    float_params: int  # parameters that stay float (biases, norm weights)
    kl: float  # mean KL(p_fp32 || p_int4) over the codebook, at the positions still masked
    agreement: float  # share of those positions where the most likely token is unchanged
    block_size: int = 32
    scope: str = "group"  # "group": this group alone at int4; "all": every group at int4 at once

    def to_dict(self) -> dict:
        data = asdict(self)
        data["patterns"] = list(self.patterns)
        return data


@dataclass
class RecordedStep:
    """One reference sampling step: what entered each stage, and the guided fp32 logits."""

    stem_inputs: tuple[torch.Tensor, ...]  # the model's inputs: what stage 0 takes
    entering: list[Activations | None]  # entering[k]: what enters stage k >= 1 (entering[0] is None)
    masked: np.ndarray  # (P, h*w) bool: positions the sampler draws at this step
    reference: np.ndarray  # (n masked, codebook_size) float32 guided logits at those positions


class RecordingDenoiser:
    """The fp32 transformer as a sampler `Denoiser` that keeps what `damage` re-runs from."""

    def __init__(self, staged, encoder_hidden_states, text_embeds, micro_conds, guidance_scale, mask_token_id):
        self.staged = staged
        self.conditioning = (encoder_hidden_states, text_embeds, micro_conds)
        self.guidance_scale = guidance_scale
        self.mask_token_id = mask_token_id
        self.steps: list[RecordedStep] = []

    @torch.inference_mode()
    def logits(self, tokens: np.ndarray, timestep: int) -> np.ndarray:
        hidden, text_embeds, micro = self.conditioning
        batch = tokens.shape[0]
        inputs = (torch.tensor(tokens), hidden, text_embeds, micro, torch.full((batch,), float(timestep)))
        entering = [None]
        logits = self.staged.run(self.staged.stem(*inputs), keep=entering).numpy()  # ([2]P, h*w, K)
        drawn = sampled_logits(logits.copy(), self.guidance_scale)  # (P, h*w, K)
        masked = tokens[-len(drawn) :].reshape(len(drawn), -1) == self.mask_token_id  # (P, h*w)
        self.steps.append(RecordedStep(inputs, entering, masked, np.ascontiguousarray(drawn[masked])))
        return logits


def sampled_logits(logits: np.ndarray, guidance_scale: float) -> np.ndarray:
    """The logits the sampler draws from: guided ([uncond; cond] -> (P, ...)) when the scale is above 1."""
    return apply_guidance(logits, guidance_scale) if guidance_scale > 1 else logits


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) per row, in float64, ROW_CHUNK rows at a time."""
    out = np.empty(len(p_logits))
    for start in range(0, len(p_logits), ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        log_p = torch.log_softmax(torch.from_numpy(p_logits[rows]).double(), dim=-1)
        log_q = torch.log_softmax(torch.from_numpy(q_logits[rows]).double(), dim=-1)
        out[rows] = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).numpy()  # >= 0 up to rounding
    return out


@torch.inference_mode()
def damage(staged: StagedForward, steps: list[RecordedStep], start: int, guidance_scale: float) -> tuple[float, float]:
    """(mean KL, top-1 agreement) of the current weights against the recorded reference, from stage `start`."""
    kl_sum, agree, count = 0.0, 0, 0
    for step in steps:
        entering = staged.stem(*step.stem_inputs) if start == 0 else step.entering[start]
        logits = staged.run(entering, start=max(start, 1)).numpy()
        quantized = sampled_logits(logits, guidance_scale)[step.masked]  # (n masked, K)
        kl_sum += float(kl_divergence(step.reference, quantized).sum())
        agree += int((step.reference.argmax(-1) == quantized.argmax(-1)).sum())
        count += len(quantized)
    return kl_sum / count, agree / count


def check_settings(config: TransformerConfig, size: int, steps: int, prompts: list[str], block_size: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise OptionsError(f"steps must be an integer >= 1, got {steps!r}")
    stride = config.token_stride
    if not isinstance(size, int) or size < stride or size % stride:
        raise OptionsError(f"size must be a positive multiple of {stride} (this model's token stride), got {size!r}")
    if not prompts:
        raise OptionsError("the prompt list is empty: give at least one prompt (or none, for the default prompts)")
    if not all(isinstance(p, str) for p in prompts):
        raise OptionsError("prompts must be strings")
    if block_size not in BLOCK_SIZES:
        raise OptionsError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size!r}")


@torch.inference_mode()
def encode_prompts(model_dir, texts: list[str], text_encoder_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_embeds (B, Dp), penultimate hidden states (B, 77, Dt)) from the model's CLIP text encoder."""
    from meissonic_edge.model.checkpoint import load_clip_tokenizer, load_text_encoder
    from meissonic_edge.model.reference import MAX_TEXT_TOKENS

    tokenizer = load_clip_tokenizer(model_dir, text_encoder_dir)
    encoder = load_text_encoder(model_dir, text_encoder_dir)
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
    out = encoder(ids.input_ids, output_hidden_states=True)
    return out.text_embeds.float(), out.hidden_states[-2].float()


def measure_sensitivity(
    model_dir: str | Path,
    size: int = 256,
    steps: int = 4,
    prompts: list[str] | None = None,
    seed: int = 0,
    block_size: int = 32,
    progress: bool = True,
    guidance_scale: float = 9.0,
    text_encoder_dir: str | Path | None = None,
) -> list[GroupSensitivity]:
    """Int4 damage of every layer group of the model's transformer, one group at a time, then all at once.

    Returns one entry per group in forward order, then the all-groups entry (scope "all", name ALL_GROUPS).
    """
    from meissonic_edge.model.checkpoint import load_scheduler_config, load_transformer
    from meissonic_edge.model.consistency import check_model_dir
    from meissonic_edge.model.layout import transformer_folder

    began = time.perf_counter()
    if prompts is None:
        prompts = DEFAULT_PROMPTS
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    check_model_dir(model_dir, text_encoder_dir)
    config = TransformerConfig.from_json_file(transformer_folder(Path(model_dir)) / "config.json")
    check_settings(config, size, steps, prompts, block_size)
    scheduler = load_scheduler_config(model_dir)
    options = GenerationOptions(steps=steps, guidance_scale=guidance_scale, seed=seed, height=size, width=size)
    options.validate(config.token_stride)

    logger.info("encoding %d prompt(s) with the model's text encoder", len(prompts))
    texts = [options.negative_prompt] * len(prompts) + prompts if options.guided else prompts
    text_embeds, hidden = encode_prompts(model_dir, texts, text_encoder_dir)
    gc.collect()  # the text encoder is no longer needed: free it before the transformer loads

    logger.info("loading the transformer")
    model = load_transformer(model_dir).requires_grad_(False)
    staged = StagedForward(model)
    groups = layer_groups(model)
    micro = torch.from_numpy(np.tile(options.micro_conds(), (len(texts), 1)))
    recorder = RecordingDenoiser(staged, hidden, text_embeds, micro, guidance_scale, scheduler.mask_token_id)
    grid = (size // VQ_STRIDE, size // VQ_STRIDE)
    logger.info("fp32 reference: %d step(s) at %dx%d, %d prompt(s)", steps, size, size, len(prompts))
    sample(
        recorder, len(prompts), grid, scheduler.mask_token_id, options, scheduler.masking_schedule, progress=progress
    )
    records = recorder.steps

    results = []
    bar = tqdm(total=len(groups) + 1, desc="int4 sensitivity", unit="group", disable=not progress)
    for group in groups:
        originals = quantize_layers(group.layers, block_size)
        kl, agreement = damage(staged, records, group.stage, guidance_scale)
        restore_layers(group.layers, originals)
        results.append(
            GroupSensitivity(group.name, group.patterns, group.params, group.float_params, kl, agreement, block_size)
        )
        logger.info("%s: KL %.4g, agreement %.4f", group.name, kl, agreement)
        bar.update()
    for group in groups:  # every group at once, last: these weights need not come back
        quantize_layers(group.layers, block_size, keep=False)
    kl, agreement = damage(staged, records, 0, guidance_scale)
    params, floats = sum(g.params for g in groups), sum(g.float_params for g in groups)
    results.append(GroupSensitivity(ALL_GROUPS, ("*",), params, floats, kl, agreement, block_size, scope="all"))
    logger.info("%s: KL %.4g, agreement %.4f", ALL_GROUPS, kl, agreement)
    bar.update()
    bar.close()
    logger.info("measured %d groups in %.0f s", len(groups), time.perf_counter() - began)
    return results
