"""Configs read from a model directory: the transformer architecture and the scheduler.

Plain dataclasses, no torch: the exporters, the runtime and the CLI all read them. Keys beginning with
`_` (`_class_name`, `_diffusers_version`) are metadata written by diffusers and are ignored; any other
key we do not know, or a key we need that is missing, is an error rather than a silent default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from meissonic_edge.errors import ConfigError, ModelDirError

VQ_STRIDE = 16  # pixels per VQ token along each side (the f=16 VQ-GAN)
MASKING_SCHEDULES = ("cosine", "linear")  # share of tokens still masked after each step (sampler.mask_ratio)


def read_json(path: Path) -> dict:
    """Read a JSON object from `path`, turning every failure into a one-line error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelDirError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _from_dict(cls, data: dict, source: str):
    """Build dataclass `cls` from `data`, refusing unknown and missing keys; `_meta` keys are ignored."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
    for name, value in values.items():
        expected = fields[name].type
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
            "tuple[int, int, int]": isinstance(value, (list, tuple))
            and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        }[expected]
        if not ok:
            raise ConfigError(f"{source}: {name} must be {expected}, got {value!r}")
    if "axes_dims_rope" in values:
        values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
    config = cls(**values)
    config.validate(source)
    return config


@dataclass(frozen=True)
class TransformerConfig:
    """The Meissonic transformer's `transformer/config.json` (upstream's `Transformer2DModel` arguments)."""

    num_layers: int  # double-stream blocks: text and image keep separate weights, attend jointly
    num_single_layers: int  # single-stream blocks over the concatenated [text; image] sequence
    num_attention_heads: int
    attention_head_dim: int  # heads x head_dim is the inner width C used everywhere
    joint_attention_dim: int  # width of the text encoder's hidden states (Dt)
    pooled_projection_dim: int  # width of the conditioning vector; must equal C (see MEISSONIC.md step 2)
    axes_dims_rope: tuple[int, int, int]  # rotary widths per position axis; they sum to head_dim
    vocab_size: int  # token embedding rows: the codebook plus the mask token (and spares)
    codebook_size: int  # VQ codebook entries: the logits' last dimension
    downsample: bool = False  # 2x2 feature compression of the token grid before the blocks
    upsample: bool = False  # the matching 2x2 transposed convolution after them
    # Upstream arguments that the forward never reads; kept so that configs round-trip.
    patch_size: int = 1
    in_channels: int = 64
    guidance_embeds: bool = False

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def token_stride(self) -> int:
        """Pixels per side that one step of the token grid covers: the grid must be a multiple of this / 16."""
        return VQ_STRIDE * (2 if self.downsample else 1)

    def validate(self, source: str = "transformer config") -> None:
        for name in ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "codebook_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 0 or self.num_single_layers < 0:
            raise ConfigError(f"{source}: num_layers and num_single_layers must be >= 0")
        if self.pooled_projection_dim != self.inner_dim:
            raise ConfigError(
                f"{source}: pooled_projection_dim ({self.pooled_projection_dim}) must equal "
                f"num_attention_heads x attention_head_dim ({self.inner_dim})"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ConfigError(
                f"{source}: axes_dims_rope {list(self.axes_dims_rope)} must be even and sum to "
                f"attention_head_dim ({self.attention_head_dim})"
            )
        if self.vocab_size <= self.codebook_size:
            raise ConfigError(
                f"{source}: vocab_size ({self.vocab_size}) must exceed codebook_size ({self.codebook_size}) "
                "to leave room for the mask token"
            )
        if self.downsample != self.upsample:
            raise ConfigError(f"{source}: downsample and upsample must be equal (the logits keep the token grid)")
        if self.guidance_embeds:
            raise ConfigError(f"{source}: guidance_embeds=true is not supported (Meissonic does not use it)")

    @classmethod
    def from_dict(cls, data: dict, source: str = "transformer config") -> TransformerConfig:
        return _from_dict(cls, data, source)

    @classmethod
    def from_json_file(cls, path: Path) -> TransformerConfig:
        return cls.from_dict(read_json(path), str(path))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "Transformer2DModel", **data}


@dataclass(frozen=True)
class SchedulerConfig:
    """The `scheduler/scheduler_config.json` of a model directory."""

    mask_token_id: int  # the token id that marks a position not yet decided
    masking_schedule: str = "cosine"  # share of tokens still masked after each step: "cosine" or "linear"

    def validate(self, source: str = "scheduler config") -> None:
        if self.masking_schedule not in MASKING_SCHEDULES:
            raise ConfigError(f"{source}: masking_schedule must be 'cosine' or 'linear', got {self.masking_schedule!r}")
        if self.mask_token_id < 0:
            raise ConfigError(f"{source}: mask_token_id must be >= 0, got {self.mask_token_id}")

    @classmethod
    def from_dict(cls, data: dict, source: str = "scheduler config") -> SchedulerConfig:
        return _from_dict(cls, data, source)

    @classmethod
    def from_json_file(cls, path: Path) -> SchedulerConfig:
        return cls.from_dict(read_json(path), str(path))

    def to_dict(self) -> dict:
        return {"_class_name": "Scheduler", **dataclasses.asdict(self)}
