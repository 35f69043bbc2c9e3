"""`train-demo`: train the small shapes model that ships with the package, from scratch, on a CPU.

Four stages, each in the exact Meissonic layout so that every exporter and runtime path runs on it:

1. the VQ tokenizer: a diffusers `VQModel` with f=16. First a plain autoencoder (no quantization), then
   a codebook from k-means of its latents and quantized training with the VQ-VAE loss, restarting codes
   nobody uses (the usual cure for codebook collapse). The reconstruction loss weighs the shape's pixels
   ten times the background's: otherwise "paint the background" is where a small decoder settles.
2. the training set: many random scenes (`shapes.py`), drawn and encoded to token grids once.
3. the Meissonic transformer (feature compression on) and a small CLIP text encoder, trained together
   with masked token modelling: each sample masks a random share cos(pi/2 u), u ~ U(0, 1), of its
   tokens (the paper's cosine schedule), and the cross-entropy on the masked positions is minimised. The
   timestep the model sees is the one our sampler passes at that masking ratio for a random step count,
   and one caption in ten is dropped to "" so that classifier-free guidance works.
4. the VQ decoder alone, on the frozen encoder's tokens: more steps for rendering what the tokens say.

Held-out colour/shape pairs (`shapes.HELD_OUT_PAIRS`) appear in no training image, so the adherence score
on them measures composition. Deterministic: a recipe and a seed give the same weights on the same
machine, torch version and thread count (recorded in `training_log.json`); each stage draws from its own
seeded streams, so the VQ stage can be cached (`cache_dir`) without changing what follows.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meissonic_edge.checkpoint import quiet_libraries
from meissonic_edge.clip_vocab import write_clip_tokenizer
from meissonic_edge.config import VQ_STRIDE, SchedulerConfig, TransformerConfig
from meissonic_edge.fileio import atomic_directory
from meissonic_edge.model import MeissonicTransformer
from meissonic_edge.presets import build_vqvae, write_model_index
from meissonic_edge.sampler import GENERATION_DEFAULTS_FILE
from meissonic_edge.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene, draw, random_scene

logger = logging.getLogger(__name__)

CODEBOOK_SIZE = 512
DEMO_TRANSFORMER = TransformerConfig(
    num_layers=2,
    num_single_layers=4,
    num_attention_heads=4,
    attention_head_dim=32,
    joint_attention_dim=128,
    pooled_projection_dim=128,
    axes_dims_rope=(8, 12, 12),
    vocab_size=CODEBOOK_SIZE + 1,  # the codebook and the mask token
    codebook_size=CODEBOOK_SIZE,
    downsample=True,
    upsample=True,
)
DEMO_TEXT_ENCODER = dict(  # transformers CLIPTextConfig arguments
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=128,
    max_position_embeddings=77,
)
DEMO_VQ = dict(  # diffusers VQModel arguments; 5 levels make f=16
    block_out_channels=[8, 16, 32, 128, 128],
    latent_channels=32,
    num_vq_embeddings=CODEBOOK_SIZE,
    layers_per_block=1,
    norm_num_groups=1,  # GroupNorm over all channels: narrow layers with few channels per group lost colours
)
TOKENIZER_VOCAB = 640  # asked of the BPE trainer; the captions' few words need fewer
MICRO_CONDS = (256.0, 256.0, 0.0, 0.0, 6.0)  # what the sampler passes at 256x256 (width, height, crop, score)
GENERATION_DEFAULTS = dict(steps=16, guidance_scale=4.0, height=256, width=256)  # the bundles' defaults


@dataclass(frozen=True)
class TrainingRecipe:
    seed: int = 0
    image_size: int = 256
    # VQ tokenizer
    vq_ae_steps: int = 1500  # first a plain autoencoder
    vq_steps: int = 400  # then quantized
    vq_batch: int = 4
    vq_lr: float = 2e-3
    vq_restart_every: int = 100  # steps between restarts of unused codes
    # VQ decoder fine-tuning (stage 4), on the frozen encoder's tokens
    decoder_steps: int = 800
    decoder_lr: float = 1e-3
    # training set
    dataset_size: int = 8000
    # transformer + text encoder
    steps: int = 1800
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    timestep_steps: tuple[int, int] = (8, 64)  # step counts whose timesteps the model is trained on

    @classmethod
    def quick(cls, seed: int = 0) -> TrainingRecipe:
        """A few steps of everything: for tests of the machinery, not a usable model."""
        return cls(
            seed=seed, vq_ae_steps=2, vq_steps=6, vq_restart_every=2, decoder_steps=2, dataset_size=16, steps=4, batch=4
        )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def images_tensor(scenes: list[Scene], size: int) -> torch.Tensor:
    """Scenes -> (B, 3, size, size) float32 in [0, 1]."""
    pixels = np.stack([draw(scene, size) for scene in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


COLOUR_SCALE = 8.0  # latent units per unit of colour in the first three latent channels (see colour_loss)
PATCH_WEIGHT = 10.0  # weight of the error in each token's mean colour
FOREGROUND_WEIGHT = 10.0  # reconstruction weight of the shape's pixels against the background's
COMMITMENT = 0.25  # weight of the encoder's pull towards its code (the codebook's pull towards the encoder is 1)


def vq_reconstruct(vq, images: torch.Tensor):
    """Encode, quantize (straight-through), decode; return (reconstruction, VQ loss, code ids, latents).

    The nearest-entry lookup is diffusers' (what the exported graphs do), but the loss is the VQ-VAE
    paper's: the codebook moves to the encoder's outputs at full weight and the encoder is held to its code
    at COMMITMENT. diffusers' VectorQuantizer (legacy=True, as VQModel builds it) weighs them the other way
    round, which here pulled the encoder's outputs onto a few codes: every shape came back in one average
    colour.
    """
    latents = vq.encode(images).latents  # (B, D, h, w)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (B*h*w, D)
    codebook = vq.quantize.embedding.weight  # (K, D)
    codes = torch.cdist(flat, codebook).argmin(dim=1)
    quantized = codebook[codes]
    vq_loss = F.mse_loss(quantized, flat.detach()) + COMMITMENT * F.mse_loss(flat, quantized.detach())
    straight_through = flat + (quantized - flat).detach()
    quantized_map = straight_through.reshape(latents.shape[0], latents.shape[2], latents.shape[3], -1)
    recon = vq.decoder(vq.post_quant_conv(quantized_map.permute(0, 3, 1, 2)))
    return recon, vq_loss, codes, latents


def random_images(recipe: TrainingRecipe, rng: np.random.Generator) -> torch.Tensor:
    return images_tensor([random_scene(rng) for _ in range(recipe.vq_batch)], recipe.image_size)


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L1 + MSE, with the shape's pixels weighted FOREGROUND_WEIGHT times the background's.

    The shape covers a few percent of an image: unweighted, "paint the background" is a deep minimum
    that a small decoder takes first and leaves late. The background is read from the top-left pixel,
    which no scene's shape reaches.
    """
    background = images[:, :, :1, :1]
    shape = ((images - background).abs().amax(dim=1, keepdim=True) > 0.05).float()
    weight = 1 + (FOREGROUND_WEIGHT - 1) * shape
    error = recon - images
    patch_colour = F.avg_pool2d(error, VQ_STRIDE)  # each token's mean colour error: what a token must carry
    return (
        (error.abs() * weight).mean() + (error.square() * weight).mean() + PATCH_WEIGHT * patch_colour.square().mean()
    )


def colour_loss(latents: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Hold the first three latent channels to each token's mean colour, scaled by COLOUR_SCALE.

    Without it the latents did carry colour, but in directions so small next to the shape's that the
    nearest-code lookup merged colours (red and purple, green and blue shared codes; on black nearly all
    colours did): the tokens could not say which colour a shape is, and nothing downstream can recover it.
    """
    patch = F.avg_pool2d(images, VQ_STRIDE)  # (B, 3, h, w) in [0, 1]
    return F.mse_loss(latents[:, :3], COLOUR_SCALE * (patch - 0.5))


def train_vqvae(recipe: TrainingRecipe, rng: np.random.Generator, log: dict):
    """Two phases: a plain autoencoder (no quantization), then k-means of its latents for the codebook and
    quantized training, restarting codes nobody uses."""
    vq = build_vqvae(DEMO_VQ)
    optimizer = torch.optim.AdamW(vq.parameters(), lr=recipe.vq_lr, weight_decay=0.0)
    total = recipe.vq_ae_steps + recipe.vq_steps
    losses = []
    for step in range(recipe.vq_ae_steps):
        images = random_images(recipe, rng)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, recipe.vq_lr, warmup=50)
        latents = vq.encode(images).latents
        loss = reconstruction_loss(vq.decoder(vq.post_quant_conv(latents)), images) + colour_loss(latents, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0:
            logger.info("vq autoencoder step %d/%d loss %.4f", step + 1, recipe.vq_ae_steps, np.mean(losses[-100:]))
    log["vq_autoencoder_loss"] = float(np.mean(losses[-100:]))

    init_codebook(vq, recipe, rng)
    usage = torch.zeros(CODEBOOK_SIZE)
    losses = []
    for step in range(recipe.vq_steps):
        images = random_images(recipe, rng)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe.vq_ae_steps + step, total, recipe.vq_lr, warmup=50)
        recon, vq_loss, codes, latents = vq_reconstruct(vq, images)
        loss = reconstruction_loss(recon, images) + vq_loss + colour_loss(latents, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        usage += torch.bincount(codes, minlength=CODEBOOK_SIZE)
        if (step + 1) % recipe.vq_restart_every == 0 and step + 1 < recipe.vq_steps - recipe.vq_restart_every:
            restart_unused_codes(vq, usage, latents.detach(), rng)
            usage.zero_()
        losses.append(loss.item())
        if step % 100 == 0 or step == recipe.vq_steps - 1:
            logger.info("vq step %d/%d loss %.4f", step + 1, recipe.vq_steps, np.mean(losses[-100:]))
    log["vq_final_loss"] = float(np.mean(losses[-100:]))
    return vq.eval()


@torch.no_grad()
def save_preview(vq, recipe: TrainingRecipe, path: Path, count: int = 6) -> None:
    """Scenes (top row) and their quantized reconstructions (bottom row), to look at."""
    from PIL import Image

    rng = np.random.default_rng([recipe.seed, 99])
    images = images_tensor([random_scene(rng, include_held_out=True) for _ in range(count)], recipe.image_size)
    recon = vq_reconstruct(vq, images)[0].clamp(0, 1)
    rows = [torch.cat(list(batch), dim=2) for batch in (images, recon)]
    pixels = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)


@torch.no_grad()
def init_codebook(vq, recipe: TrainingRecipe, rng: np.random.Generator, images: int = 32, rounds: int = 15) -> None:
    """k-means of the encoder's outputs on whole images: a codebook where the latents are."""
    batches = [vq.encode(random_images(recipe, rng)).latents for _ in range(-(-images // recipe.vq_batch))]
    vectors = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]) for b in batches])
    centroids = vectors[torch.from_numpy(rng.choice(len(vectors), CODEBOOK_SIZE, replace=len(vectors) < CODEBOOK_SIZE))]
    for _ in range(rounds):
        nearest = torch.cdist(vectors, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, vectors)
        counts = torch.bincount(nearest, minlength=CODEBOOK_SIZE)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    vq.quantize.embedding.weight.copy_(centroids)


@torch.no_grad()
def restart_unused_codes(vq, usage: torch.Tensor, latents: torch.Tensor, rng: np.random.Generator) -> None:
    """Move codebook entries nobody chose since the last restart onto random encoder outputs."""
    dead = torch.nonzero(usage == 0).flatten()
    if len(dead) == 0:
        return
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    picks = torch.from_numpy(rng.integers(len(vectors), size=len(dead)))
    vq.quantize.embedding.weight[dead] = vectors[picks] + 0.01 * torch.randn(len(dead), vectors.shape[1])
    logger.info("restarted %d unused codes", len(dead))


@torch.no_grad()
def encode_dataset(vq, scenes: list[Scene], size: int, chunk: int = 64) -> torch.Tensor:
    """Scenes -> their VQ tokens (N, size/16, size/16) int64."""
    out = []
    for start in range(0, len(scenes), chunk):
        latents = vq.encode(images_tensor(scenes[start : start + chunk], size)).latents
        _, _, (_, _, codes) = vq.quantize(latents)
        out.append(codes.reshape(latents.shape[0], latents.shape[2], latents.shape[3]))
    return torch.cat(out)


def all_captions() -> list[str]:
    return [
        Scene(shape=s, colour=c, position=p, background=b).caption
        for s in SHAPES
        for c in COLOURS
        for p in POSITIONS
        for b in BACKGROUNDS
    ]


def build_text_encoder(tokenizer_dir: Path):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    end = vocab["<|endoftext|>"]
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=end,
        pad_token_id=end,
        **DEMO_TEXT_ENCODER,
    )
    return CLIPTextModelWithProjection(config)


def training_timesteps(u: np.ndarray, rng: np.random.Generator, recipe: TrainingRecipe) -> np.ndarray:
    """The timestep our sampler passes when a share cos(pi/2 u) is masked, for random step counts N.

    At step i of N the sampler passes N-1-i and the masked share before that step is cos(pi/2 i/N).
    """
    lo, hi = recipe.timestep_steps
    counts = rng.integers(lo, hi + 1, size=len(u))
    return (counts - 1 - np.floor(u * counts)).astype(np.float32)


def train_transformer(recipe, tokens, captions, input_ids, text_encoder, rng, log):
    transformer = MeissonicTransformer(DEMO_TRANSFORMER)
    transformer.rope_dtype = torch.float32  # training speed; the rotary angles here are small integers
    parameters = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.99))
    mask_id = DEMO_TRANSFORMER.codebook_size
    empty = len(input_ids) - 1  # the last row of input_ids is the empty prompt
    count, height, width = tokens.shape
    seq = height * width
    micro = torch.tensor(MICRO_CONDS).expand(recipe.batch, 5)
    losses = []
    for step in range(recipe.steps):
        pick = rng.integers(count, size=recipe.batch)
        target = tokens[pick].reshape(recipe.batch, seq)
        u = rng.random(recipe.batch)
        masked_count = np.clip(np.ceil(np.cos(np.pi / 2 * u) * seq), 1, seq).astype(np.int64)
        ranks = np.argsort(np.argsort(rng.random((recipe.batch, seq)), axis=1), axis=1)
        mask = torch.from_numpy(ranks < masked_count[:, None])
        inputs = torch.where(mask, mask_id, target).reshape(recipe.batch, height, width)
        prompt_rows = np.where(rng.random(recipe.batch) < recipe.caption_dropout, empty, captions[pick])
        timestep = torch.from_numpy(training_timesteps(u, rng, recipe))

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe.steps, recipe.lr, recipe.warmup)
        text = text_encoder(input_ids[prompt_rows], output_hidden_states=True)
        logits = transformer(inputs, text.hidden_states[-2], text.text_embeds, micro, timestep)  # (B, seq, K)
        loss = F.cross_entropy(logits[mask], target[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == recipe.steps - 1:
            logger.info("transformer step %d/%d loss %.4f", step + 1, recipe.steps, float(np.mean(losses[-100:])))
    log["transformer_final_loss"] = float(np.mean(losses[-100:]))
    log["transformer_loss_curve"] = [round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)]
    return transformer.eval(), text_encoder.eval()


def vq_stage_key(recipe: TrainingRecipe) -> str:
    """Names a VQ stage result: everything that stage depends on."""
    fields = ("seed", "image_size", "vq_ae_steps", "vq_steps", "vq_batch", "vq_lr")
    fields += ("vq_restart_every",)
    return "vqvae-" + "-".join(str(getattr(recipe, name)) for name in fields)


def stage_rng(recipe: TrainingRecipe, stage: int) -> np.random.Generator:
    """Each stage draws from its own seeded streams, so a cached stage 1 leaves stages 2 and 3 unchanged."""
    torch.manual_seed(recipe.seed * 100 + stage)
    return np.random.default_rng([recipe.seed, stage])


def vq_stage(recipe: TrainingRecipe, log: dict, cache_dir: Path | None):
    """Stage 1, or its saved result from `cache_dir` when the same recipe trained it before."""
    cached = cache_dir / vq_stage_key(recipe) if cache_dir is not None else None
    if cached is not None and (cached / "config.json").is_file():
        from diffusers import VQModel

        logger.info("stage 1: the VQ tokenizer, from %s", cached)
        log.update(json.loads((cached / "stage_log.json").read_text()))
        return VQModel.from_pretrained(cached).eval()
    logger.info("stage 1: the VQ tokenizer")
    started = time.perf_counter()
    vq = train_vqvae(recipe, stage_rng(recipe, 1), log)
    log["vq_seconds"] = round(time.perf_counter() - started, 1)
    if cached is not None:
        vq.save_pretrained(cached, safe_serialization=True)
        save_preview(vq, recipe, cached / "preview.png")
        stage_log = {k: log[k] for k in ("vq_autoencoder_loss", "vq_final_loss", "vq_seconds")}
        (cached / "stage_log.json").write_text(json.dumps(stage_log, indent=2) + "\n")
    return vq


def train_demo(
    out_dir: str | Path,
    recipe: TrainingRecipe | None = None,
    dtype=torch.float16,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
) -> Path:
    """Train the demo model and write it as a model directory in the upstream layout; return its path.

    `cache_dir` keeps the trained VQ tokenizer (stage 1) between runs of the same recipe.
    """
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    recipe = recipe or TrainingRecipe()
    log = {"recipe": asdict(recipe), "torch": torch.__version__, "threads": torch.get_num_threads()}
    log["machine"] = platform.processor() or platform.machine()
    started = time.perf_counter()
    with atomic_directory(out_dir, overwrite) as tmp, torch.random.fork_rng(), quiet_libraries():
        torch.use_deterministic_algorithms(True)
        vq = vq_stage(recipe, log, Path(cache_dir) if cache_dir is not None else None)

        logger.info("stage 2: encoding %d training scenes", recipe.dataset_size)
        rng = stage_rng(recipe, 2)
        scenes = [random_scene(rng) for _ in range(recipe.dataset_size)]
        tokens = encode_dataset(vq, scenes, recipe.image_size)
        log["codes_used"] = int(torch.unique(tokens).numel())

        write_clip_tokenizer(tmp / "tokenizer", TOKENIZER_VOCAB, corpus=all_captions())
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        caption_list = sorted({scene.caption for scene in scenes})
        row = {caption: i for i, caption in enumerate(caption_list)}
        input_ids = tokenizer(caption_list + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        captions = np.array([row[scene.caption] for scene in scenes])

        logger.info("stage 3: transformer and text encoder")
        rng = stage_rng(recipe, 3)
        text_encoder = build_text_encoder(tmp / "tokenizer")
        stage3 = time.perf_counter()
        transformer, text_encoder = train_transformer(recipe, tokens, captions, input_ids, text_encoder, rng, log)
        log["transformer_seconds"] = round(time.perf_counter() - stage3, 1)
        torch.use_deterministic_algorithms(False)

        (tmp / "transformer").mkdir()
        (tmp / "transformer" / "config.json").write_text(json.dumps(DEMO_TRANSFORMER.to_dict(), indent=2) + "\n")
        state = {k: v.detach().to(dtype).contiguous() for k, v in transformer.state_dict().items()}
        save_file(state, tmp / "transformer" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        text_encoder.to(dtype).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        vq.to(dtype).save_pretrained(tmp / "vqvae", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        scheduler = SchedulerConfig(mask_token_id=DEMO_TRANSFORMER.codebook_size)
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler.to_dict(), indent=2) + "\n")
        write_model_index(tmp)
        (tmp / GENERATION_DEFAULTS_FILE).write_text(json.dumps(GENERATION_DEFAULTS, indent=2) + "\n")
        log["total_seconds"] = round(time.perf_counter() - started, 1)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
        finetune_decoder(tmp, recipe)
    logger.info("trained in %.0f s", json.loads((Path(out_dir) / "training_log.json").read_text())["total_seconds"])
    return Path(out_dir)


def finetune_decoder(model_dir: Path, recipe: TrainingRecipe) -> None:
    """Stage 4: train the VQ decoder (and post_quant_conv) alone on the saved model's frozen tokens.

    The encoder and codebook stay as they are, so the tokens the transformer learnt stay valid; the decoder
    gets the steps it needs to render the tokens' colours, which the first stage's budget left short. It
    starts from the saved (fp16) weights, so running it on a saved model directory is the same as
    running it inside `train_demo`. Updates `training_log.json`.
    """
    from diffusers import VQModel

    started = time.perf_counter()
    log = json.loads((model_dir / "training_log.json").read_text())
    with torch.random.fork_rng(), quiet_libraries():
        torch.use_deterministic_algorithms(True)
        rng = stage_rng(recipe, 4)
        vq = VQModel.from_pretrained(model_dir / "vqvae").float()
        trained = list(vq.decoder.parameters()) + list(vq.post_quant_conv.parameters())
        for parameter in vq.parameters():
            parameter.requires_grad_(False)
        for parameter in trained:
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(trained, lr=recipe.decoder_lr, weight_decay=0.0)
        losses = []
        for step in range(recipe.decoder_steps):
            images = random_images(recipe, rng)
            with torch.no_grad():
                latents = vq.encode(images).latents
                quantized, _, _ = vq.quantize(latents)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, recipe.decoder_steps, recipe.decoder_lr, warmup=20)
            loss = reconstruction_loss(vq.decoder(vq.post_quant_conv(quantized)), images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == recipe.decoder_steps - 1:
                logger.info("decoder step %d/%d loss %.4f", step + 1, recipe.decoder_steps, np.mean(losses[-100:]))
        torch.use_deterministic_algorithms(False)
        vq.half().save_pretrained(model_dir / "vqvae", safe_serialization=True)
    log["decoder_final_loss"] = float(np.mean(losses[-100:])) if losses else None
    log["decoder_seconds"] = round(time.perf_counter() - started, 1)
    log["total_seconds"] = round(log["total_seconds"] + log["decoder_seconds"], 1)
    (model_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
