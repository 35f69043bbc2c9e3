"""`train-demo`: train the small shapes model that ships with the package, from scratch, on a CPU.

Three stages, each in the exact Meissonic layout so that every exporter and runtime path runs on it:

1. the VQ tokenizer: a diffusers `VQModel` with f=16, built around a codebook fixed first. The codebook
   is k-means of the training scenes' 16x16 patches in pixel space (`patch_codebook`); a scene's tokens
   are its patches' nearest centroids. The decoder (with the code vectors) is then taught to draw crops
   from their tokens, and the encoder to pick each patch's token, each a plain supervised job.
2. the training set: many random scenes (`shapes.py`), drawn and turned into token grids once.
3. the Meissonic transformer (feature compression on) and a small CLIP text encoder, trained together
   with masked token modelling: each sample masks a random share cos(pi/2 u), u ~ U(0, 1), of its
   tokens (the paper's cosine schedule), and the cross-entropy on the masked positions is minimised. The
   timestep the model sees is the one our sampler passes at that masking ratio for a random step count,
   and one caption in ten is dropped to "" so that classifier-free guidance works.

Held-out colour/shape pairs (`shapes.HELD_OUT_PAIRS`) appear in no training image, so the adherence score
on them measures composition. Deterministic: a recipe and a seed give the same weights on the same
machine, torch version and thread count (recorded in `training_log.json`); each stage draws from its own
seeded streams, so the VQ stage can be cached (`cache_dir`) without changing what follows.
"""

from __future__ import annotations

import hashlib
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

from meissonic_edge.demo.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene, draw, random_scene
from meissonic_edge.fileio import atomic_directory
from meissonic_edge.model.checkpoint import quiet_libraries
from meissonic_edge.model.clip_vocab import write_clip_tokenizer
from meissonic_edge.model.presets import build_vqvae, write_model_index
from meissonic_edge.model.transformer import MeissonicTransformer
from meissonic_edge.runtime.config import VQ_STRIDE, SchedulerConfig, TransformerConfig
from meissonic_edge.runtime.sampler import GENERATION_DEFAULTS_FILE

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
# The bundles' defaults, chosen on the trained (not held-out) prompts of the adherence set. More steps draw
# fewer edge tokens together, so edges come out straighter: trained prompts 91% at 64 steps, 96% at 128, 97%
# at 256 (mean of four seeds of batches of 15; the model was trained on the timesteps of 8- and 64-step
# schedules, and still improves). Tokens drawn at softmax temperature 0.5 rather than 1 keep to the model's
# likelier edge tokens, so outlines come out more regular (trained prompts at 256 steps, two seeds: 0.98 at
# 1, 0.97 at 0.7, 0.99 at 0.5, 0.98 at 0.3). Guidance 1 (none) and 1.5 scored alike at 64 steps (91% and
# 89%, mean of five seeds); 2 and more did worse (stronger guidance amplifies this small model's tail
# probabilities into speckles), and without guidance a step costs half. Gumbel temperature 0 (upstream: 2 going
# to 0) keeps the most confident tokens first, so a shape's edge tokens come last, each drawn with its
# neighbours known: held-out prompts at 256 steps, seed 0, adherence 0.93 and outline IoU 0.918 against 0.91
# and 0.903 (seed 1: 0.96 and 0.919); 0.5 going to 0 gave 0.91 and 0.907.
GENERATION_DEFAULTS = dict(
    steps=256, guidance_scale=1.0, temperature=(0.0, 0.0), token_temperature=0.5, height=256, width=256
)


@dataclass(frozen=True)
class TrainingRecipe:
    seed: int = 0
    image_size: int = 256
    # VQ tokenizer
    vq_images: int = 3000  # scenes whose patches the codebook is clustered from
    kmeans_rounds: int = 25
    decoder_steps: int = 1200
    encoder_steps: int = 400
    vq_batch: int = 32  # crops per step
    crop_tokens: int = 8  # crop side in tokens (128 pixels)
    vq_lr: float = 2e-3
    # training set
    dataset_size: int = 8000
    # transformer + text encoder
    steps: int = 4800
    batch: int = 32  # smaller batches, more steps: lower loss than 2400 x 64 in the same time
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    timestep_steps: tuple[int, int] = (8, 64)  # step counts whose timesteps the model is trained on
    # stage 3 forward and backward under bfloat16 autocast: steps ~25% faster on the AMD EPYC the shipped model
    # was trained on, but 16% slower on a later Intel Xeon (0.56 s against 0.48 s for a step alone)
    bf16: bool = True

    @classmethod
    def quick(cls, seed: int = 0) -> TrainingRecipe:
        """A few steps of everything: for tests of the machinery, not a usable model."""
        return cls(
            seed=seed,
            vq_images=8,
            kmeans_rounds=2,
            decoder_steps=2,
            encoder_steps=2,
            vq_batch=2,
            dataset_size=16,
            steps=4,
            batch=4,
        )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


DATASET_DIGEST_SCENES = 16  # scenes drawn to fingerprint the dataset in a cached VQ stage's name
FOREGROUND_WEIGHT = 4.0  # reconstruction weight of the shape's pixels against the background's
DESCRIPTOR_POOL = 2  # a patch's descriptor is its pixels average-pooled by this: (16/2)^2 * 3 = 192 numbers


def images_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 images -> (N, 3, S, S) float32 in [0, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def nearest_centroid(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index of each point's nearest centroid, `chunk` points at a time (the distance matrix stays small)."""
    return torch.cat([torch.cdist(points[i : i + chunk], centroids).argmin(1) for i in range(0, len(points), chunk)])


def patch_descriptors(pixels: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 images -> (N, S/16 * S/16, 192) float: each 16x16 patch, pooled 2x, flattened."""
    x = F.avg_pool2d(images_tensor(pixels), DESCRIPTOR_POOL)
    n, c, h, w = x.shape
    p = VQ_STRIDE // DESCRIPTOR_POOL
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def assign_codes(pixels: np.ndarray, centroids: torch.Tensor) -> torch.Tensor:
    """Each patch's nearest centroid: (N, S, S, 3) uint8 -> (N, S/16, S/16) int64 token grids."""
    n, size = pixels.shape[0], pixels.shape[1] // VQ_STRIDE
    return nearest_centroid(patch_descriptors(pixels).reshape(-1, centroids.shape[1]), centroids).reshape(n, size, size)


def patch_codebook(recipe: TrainingRecipe, rng: np.random.Generator, log: dict) -> torch.Tensor:
    """The codebook in pixel space: weighted k-means of the patch descriptors of `vq_images` scenes.

    The images are few colours on flat ground, so most patches repeat exactly: k-means runs on the unique
    descriptors weighted by their counts (about 43 thousand of 768 thousand for 3000 scenes). It starts
    from the 20 heaviest (the flat patches of each background and colour) and random others, and moves
    an emptied centroid onto the worst-fitted point, so every code is used.
    """
    pixels = np.stack([draw(random_scene(rng), recipe.image_size) for _ in range(recipe.vq_images)])
    quantized = (patch_descriptors(pixels).reshape(-1, 3 * (VQ_STRIDE // DESCRIPTOR_POOL) ** 2) * 255).round()
    unique, counts = torch.unique(quantized.to(torch.uint8), dim=0, return_counts=True)
    points, weights = unique.float() / 255.0, counts.float()
    heaviest = torch.argsort(weights, descending=True, stable=True)[:20]
    others = torch.from_numpy(rng.choice(len(points), CODEBOOK_SIZE - 20, replace=len(points) < CODEBOOK_SIZE))
    centroids = torch.cat([points[heaviest], points[others]])
    for _ in range(recipe.kmeans_rounds):
        nearest = nearest_centroid(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points * weights[:, None])
        mass = torch.zeros(CODEBOOK_SIZE).index_add_(0, nearest, weights)
        centroids = torch.where(mass[:, None] > 0, sums / mass.clamp(min=1e-9)[:, None], centroids)
        empty = torch.nonzero(mass == 0).flatten()[: len(points)]
        if len(empty):
            misfit = ((points - centroids[nearest]) ** 2).sum(1) * weights
            centroids[empty] = points[torch.topk(misfit, len(empty)).indices]
    error = (((points - centroids[nearest]) ** 2).sum(1) * weights).sum() / weights.sum()
    log["codebook_unique_patches"] = len(points)
    log["codebook_mean_squared_error"] = float(error)
    logger.info("codebook: %d centroids from %d unique patches, mse %.5f", CODEBOOK_SIZE, len(points), error)
    return centroids


def codebook_embedding(centroids: torch.Tensor, dims: int) -> torch.Tensor:
    """The codebook's starting latent vectors: the centroids' first `dims` principal components, unit std."""
    centred = centroids - centroids.mean(0)
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[:dims]
    embedding = centred @ basis.T
    return embedding / embedding.std(0)


def shape_crops(recipe: TrainingRecipe, rng: np.random.Generator, centroids: torch.Tensor, count: int):
    """Fresh scenes cut to `crop_tokens`-token squares on the token grid, most around the shape.

    The VQ networks are convolutional (no attention), so a crop trains them as a whole image does, and
    crops spend the steps where the shapes are: the shape covers a few percent of a whole image. A
    quarter of the crops are anywhere, for the background. Returns (pixels (B, 3, s, s) in [0, 1],
    codes (B, c, c), shape mask (B, 1, s, s)).
    """
    grid, side = recipe.image_size // VQ_STRIDE, recipe.crop_tokens
    scenes = [random_scene(rng) for _ in range(count)]
    pixels = np.stack([draw(scene, recipe.image_size) for scene in scenes])
    codes = assign_codes(pixels, centroids)
    background = pixels[:, :1, :1, :].astype(np.int16)
    shape = np.abs(pixels.astype(np.int16) - background).max(-1) > 12
    images, grids, masks = [], [], []
    for i, scene in enumerate(scenes):
        if rng.random() < 0.25:
            top, left = rng.integers(grid - side + 1, size=2)
        else:
            cx, cy = (c / VQ_STRIDE - side / 2 + rng.uniform(-2.5, 2.5) for c in scene.centre(recipe.image_size))
            top, left = (int(np.clip(round(c), 0, grid - side)) for c in (cy, cx))
        rows, cols = (
            slice(top * VQ_STRIDE, (top + side) * VQ_STRIDE),
            slice(left * VQ_STRIDE, (left + side) * VQ_STRIDE),
        )
        images.append(pixels[i, rows, cols])
        masks.append(shape[i, rows, cols])
        grids.append(codes[i, top : top + side, left : left + side])
    return images_tensor(np.stack(images)), torch.stack(grids), torch.from_numpy(np.stack(masks))[:, None].float()


def decode_codes(vq, codes: torch.Tensor) -> torch.Tensor:
    """Token grids (B, h, w) -> images (B, 3, 16h, 16w), the way the exported decoder graph does it."""
    latents = vq.quantize.embedding(codes).permute(0, 3, 1, 2)
    return vq.decoder(vq.post_quant_conv(latents))


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """L1 + MSE, with the shape's pixels weighted FOREGROUND_WEIGHT times the background's."""
    weight = 1 + (FOREGROUND_WEIGHT - 1) * shape
    error = recon - images
    return (error.abs() * weight).mean() + (error.square() * weight).mean()


def encoder_logits(vq, images: torch.Tensor) -> torch.Tensor:
    """Minus the squared distance of each encoder output to each code: (B*h*w, K); its argmax is the
    nearest code, which is what the quantizer picks."""
    latents = vq.encode(images).latents
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    codebook = vq.quantize.embedding.weight.detach()
    return 2 * flat @ codebook.T - flat.square().sum(1, keepdim=True) - codebook.square().sum(1)


def train_vqvae(recipe: TrainingRecipe, rng: np.random.Generator, log: dict):
    """The tokenizer in three steps: a patch codebook by k-means in pixel space; the decoder (with
    post_quant_conv and the code vectors) taught to draw each crop from its codes; the encoder (with
    quant_conv) taught to pick each patch's code, by cross-entropy over its distances to the code vectors.

    A VQ-VAE trained end to end on this budget used nearly all codes for noise and came back with wrong
    colours; here the tokens are fixed first, so they are clean (a flat patch is always the same code)
    and mean the same thing everywhere, and each network has one plain supervised job.
    """
    vq = build_vqvae(DEMO_VQ)
    centroids = patch_codebook(recipe, rng, log)
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(codebook_embedding(centroids, DEMO_VQ["latent_channels"]))

    stages = (
        (
            "decoder",
            recipe.decoder_steps,
            [*vq.decoder.parameters(), *vq.post_quant_conv.parameters(), *vq.quantize.parameters()],
        ),
        ("encoder", recipe.encoder_steps, [*vq.encoder.parameters(), *vq.quant_conv.parameters()]),
    )
    for name, steps, parameters in stages:
        optimizer = torch.optim.AdamW(parameters, lr=recipe.vq_lr, weight_decay=0.0)
        losses = []
        for step in range(steps):
            images, codes, shape = shape_crops(recipe, rng, centroids, recipe.vq_batch)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, recipe.vq_lr, warmup=30)
            if name == "decoder":
                loss = reconstruction_loss(decode_codes(vq, codes), images, shape)
            else:
                loss = F.cross_entropy(encoder_logits(vq, images), codes.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == steps - 1:
                logger.info("vq %s step %d/%d loss %.4f", name, step + 1, steps, np.mean(losses[-100:]))
        log[f"vq_{name}_loss"] = float(np.mean(losses[-100:])) if losses else None

    with torch.no_grad():  # the encoder's agreement with the codebook on fresh whole scenes
        pixels = np.stack([draw(random_scene(rng, include_held_out=True), recipe.image_size) for _ in range(32)])
        images = images_tensor(pixels)
        picked = encoder_logits(vq, images).argmax(1)
        log["vq_encoder_token_accuracy"] = float((picked == assign_codes(pixels, centroids).flatten()).float().mean())
    logger.info("vq encoder picks the codebook's token for %.1f%% of patches", 100 * log["vq_encoder_token_accuracy"])
    return vq.eval(), centroids


@torch.no_grad()
def save_preview(vq, centroids: torch.Tensor, recipe: TrainingRecipe, path: Path, count: int = 6) -> None:
    """Scenes (top row), decoded from their codebook tokens (middle) and from the encoder's tokens (bottom)."""
    from PIL import Image

    rng = np.random.default_rng([recipe.seed, 99])
    pixels = np.stack([draw(random_scene(rng, include_held_out=True), recipe.image_size) for _ in range(count)])
    images = images_tensor(pixels)
    size = recipe.image_size // VQ_STRIDE
    encoded = encoder_logits(vq, images).argmax(1).reshape(count, size, size)
    rows = [
        images,
        decode_codes(vq, assign_codes(pixels, centroids)).clamp(0, 1),
        decode_codes(vq, encoded).clamp(0, 1),
    ]
    rows = [torch.cat(list(batch), dim=2) for batch in rows]
    Image.fromarray((torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def dataset_tokens(recipe: TrainingRecipe, scenes: list[Scene], centroids: torch.Tensor, chunk: int = 500):
    """The training scenes' token grids: each patch's codebook token, the one the encoder learnt to pick."""
    grids = []
    for start in range(0, len(scenes), chunk):
        pixels = np.stack([draw(scene, recipe.image_size) for scene in scenes[start : start + chunk]])
        grids.append(assign_codes(pixels, centroids))
    return torch.cat(grids)


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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            text = text_encoder(input_ids[prompt_rows], output_hidden_states=True)
            logits = transformer(inputs, text.hidden_states[-2], text.text_embeds, micro, timestep)  # (B, seq, K)
        loss = F.cross_entropy(logits[mask].float(), target[mask])
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
    """Names a VQ stage result: everything that stage depends on. The dataset counts too (vocabulary,
    sizes, drawing): a digest of the first scenes the stage's random stream draws, and their pixels."""
    fields = ("seed", "image_size", "vq_images", "kmeans_rounds", "decoder_steps", "encoder_steps", "vq_batch")
    fields += ("crop_tokens", "vq_lr")
    rng = np.random.default_rng([recipe.seed, 1])
    digest = hashlib.sha256()
    for _ in range(DATASET_DIGEST_SCENES):
        scene = random_scene(rng)
        digest.update(repr(scene).encode() + draw(scene, recipe.image_size).tobytes())
    return "vqvae-" + "-".join(str(getattr(recipe, name)) for name in fields) + "-" + digest.hexdigest()[:10]


def stage_rng(recipe: TrainingRecipe, stage: int) -> np.random.Generator:
    """Each stage draws from its own seeded streams, so a cached stage 1 leaves stages 2 and 3 unchanged."""
    torch.manual_seed(recipe.seed * 100 + stage)
    return np.random.default_rng([recipe.seed, stage])


def vq_stage(recipe: TrainingRecipe, log: dict, cache_dir: Path | None):
    """Stage 1 -> (VQModel, pixel-space centroids), or its saved result from `cache_dir` when the same
    recipe trained it before."""
    from safetensors.torch import load_file, save_file

    cached = cache_dir / vq_stage_key(recipe) if cache_dir is not None else None
    if cached is not None and (cached / "config.json").is_file():
        from diffusers import VQModel

        logger.info("stage 1: the VQ tokenizer, from %s", cached)
        log.update(json.loads((cached / "stage_log.json").read_text()), vq_from_cache=str(cached))
        return VQModel.from_pretrained(cached).eval(), load_file(cached / "centroids.safetensors")["centroids"]
    logger.info("stage 1: the VQ tokenizer")
    started = time.perf_counter()
    before = set(log)
    vq, centroids = train_vqvae(recipe, stage_rng(recipe, 1), log)
    log["vq_seconds"] = round(time.perf_counter() - started, 1)
    if cached is not None:
        vq.save_pretrained(cached, safe_serialization=True)
        save_file({"centroids": centroids.contiguous()}, cached / "centroids.safetensors")
        save_preview(vq, centroids, recipe, cached / "preview.png")
        stage_log = {k: log[k] for k in set(log) - before}
        (cached / "stage_log.json").write_text(json.dumps(stage_log, indent=2, sort_keys=True) + "\n")
    return vq, centroids


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
        vq, centroids = vq_stage(recipe, log, Path(cache_dir) if cache_dir is not None else None)

        logger.info("stage 2: the tokens of %d training scenes", recipe.dataset_size)
        rng = stage_rng(recipe, 2)
        scenes = [random_scene(rng) for _ in range(recipe.dataset_size)]
        tokens = dataset_tokens(recipe, scenes, centroids)
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
        # training time of all stages: a cached VQ stage counts with the time it took when it was trained
        cached_seconds = log["vq_seconds"] if "vq_from_cache" in log else 0.0
        log["total_seconds"] = round(time.perf_counter() - started + cached_seconds, 1)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    logger.info("trained in %.0f s", json.loads((Path(out_dir) / "training_log.json").read_text())["total_seconds"])
    return Path(out_dir)
