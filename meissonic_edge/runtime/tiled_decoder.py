"""Tiled VQ decoding: the decoder run a band of rows at a time, so no full-resolution float32 activation exists.

The VQ decoder's memory is in its last levels: at 1024x1024 one activation of the final level is
128 x 1024 x 1024 floats (512 MB), and the graph holds several at once (4.6 GB measured). Plain overlapping
tiles cannot fix this exactly: every GroupNorm normalises with statistics of the whole image, so tiles
decoded on their own come out in the wrong colours (12-20 dB from the untiled image, measured).

This decoder keeps the arithmetic exact by running the decoder layer by layer instead of tile by tile:

- the stem (codebook lookup, post-quant conv, conv_in, the mid block) runs whole: it works at token
  resolution (64x64 at 1024 px), where activations are small;
- then every convolution of the up blocks runs over horizontal strips of its input, each strip with the one
  row of halo above and below that a 3x3 convolution needs, so each strip's output rows are exactly the
  untiled output's rows;
- a layer's output is kept in float16 (2 bytes per value instead of 4), and the GroupNorm statistics that the
  next layer needs (mean and variance per group, over the whole image) are summed over the strips as they
  are written, in float64; the next layer normalises with them, as the untiled graph would.

Memory is then a level's activations in float16, and not all of them:

- an upsampler's output (the largest tensor of a level: 256 channels at 1024x1024 in Meissonic, 512 MB in
  float16) is never stored. Its strips are computed from the level below when they are read: once for the
  GroupNorm statistics the next layer needs, once for that layer (the upsampler's convolution runs twice);
- a ResNet block's second convolution adds the residual and writes its output over it, in place (a strip
  reads residual rows that only it writes); when channels change, the 1x1 shortcut's output is stored as
  that residual, computed in the first convolution's pass.

So at the top level of a Meissonic decoder at 1024x1024 the decoder holds the level below (134 MB), the
first convolution's output and the residual (268 MB each), plus one strip's temporaries. Each layer is a
tiny ONNX graph with its weights (`vq_decoder_tiled/`); its session lives only while its layer runs.

The graphs and their order are written by the exporter (`export_tiled.py`) into the manifest's
`vq_decoder_tiled` entry:

    {"file": "vq_decoder_tiled/stem.onnx", "groups": 32, "eps": 1e-6,
     "ops": [{"kind": "resnet", "conv1": FILE, "conv2": FILE[, "shortcut": FILE]},
             {"kind": "upsample", "conv": FILE}, ..., {"kind": "output", "conv": FILE}]}

Graph interfaces (h rows of width w, float16 activations):
    norm-conv graphs (conv1, conv2, output):  x (1, C, h, w), mean (1, C, 1, 1), rstd (1, C, 1, 1)
                                              [+ residual (1, O, h, w) for conv2] -> y (1, O, h, w)
    shortcut graph (1x1 conv):                x (1, C, h, w) -> y (1, O, h, w)
    upsample graph:                           x (1, C, h, w) -> y (1, C, 2h, 2w)
The output graph returns float32 pixels clipped to [0, 1]; the others float16.

The strip runner (`LayerRunner`: strips, GroupNorm sums, one layer graph over strips) is shared with the
tiled encoder (`tiled_encoder.py`), which runs the VQ encoder the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from meissonic_edge.runtime.bundle import BundleError, inside

logger = logging.getLogger(__name__)

TILED_GRAPH = "vq_decoder_tiled"
STRIP_ELEMENTS = 1 << 22  # values in one strip's widest tensor (input channels x rows x width, after upsampling)
HALO = 1  # rows of context a 3x3 convolution needs on each side


class TiledError(BundleError):
    """A tiled VQ graph cannot run: a bad program, or activations float16 cannot hold."""


class TiledDecodeError(TiledError):
    """The tiled decoder cannot decode these tokens (a bad program, or values float16 cannot hold)."""


class GroupStats:
    """Sums of x and x^2 per GroupNorm group, accumulated strip by strip (float64)."""

    def __init__(self, channels: int, groups: int):
        if channels % groups:
            raise TiledError(f"{channels} channels do not split into {groups} GroupNorm groups")
        self.channels, self.groups = channels, groups
        self.sum = np.zeros(groups)
        self.squares = np.zeros(groups)
        self.count = 0

    def add(self, strip: np.ndarray) -> None:
        """strip (C, rows, w), any float dtype."""
        per_group = strip.reshape(self.groups, -1, *strip.shape[1:])  # (G, C/G, rows, w)
        for g in range(self.groups):
            values = per_group[g].astype(np.float64).ravel()
            self.sum[g] += values.sum()
            self.squares[g] += values @ values
        self.count += per_group[0].size

    def normalisation(self, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """(mean, 1/sqrt(var + eps)) per channel, shaped (1, C, 1, 1) float32, as GroupNorm computes them."""
        mean = self.sum / self.count
        variance = np.maximum(self.squares / self.count - mean * mean, 0.0)
        rstd = 1.0 / np.sqrt(variance + eps)
        per_channel = self.channels // self.groups
        shape = (1, self.channels, 1, 1)
        return (
            np.repeat(mean, per_channel).astype(np.float32).reshape(shape),
            np.repeat(rstd, per_channel).astype(np.float32).reshape(shape),
        )


def strip_rows(channels: int, width: int, scale: int, budget: int) -> int:
    """Input rows per strip so that the strip's widest tensor (after upsampling by `scale`) fits `budget`."""
    return max(1, budget // (channels * width * scale * scale))


class Stored:
    """A layer's output kept in memory: (C, H, W) float16."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape

    def rows(self, low: int, high: int) -> np.ndarray:
        return self.array[:, low:high]


class Upsampled:
    """An upsampler's output, computed from the stored level below whenever rows of it are read."""

    def __init__(self, below: Stored, session):
        self.below, self.session = below, session
        channels = session.get_outputs()[0].shape[1]
        _, height, width = below.shape
        self.shape = (channels, 2 * height, 2 * width)

    def rows(self, low: int, high: int) -> np.ndarray:
        # Output row r reads upsampled rows r-1..r+1, that is input rows (r-1)//2 .. (r+1)//2; one more input
        # row on each side keeps the rows the graph computes with zero padding (its first and last) outside.
        first = max(low // 2 - 1, 0)
        last = min((high + 1) // 2 + 1, self.below.shape[1])
        y = self.session.run(None, {"x": self.below.rows(first, last)[None]})[0][0]  # (C, 2 (last - first), 2W)
        return y[:, low - 2 * first : high - 2 * first]


class LayerRunner:
    """What the tiled decoder and the tiled encoder (`tiled_encoder.py`) share: a manifest program of layer
    graphs, each run over strips of rows of its input with the GroupNorm sums of its output kept.

    A layer is a 3x3 convolution with stride 1 (padding 1 all round: output row r reads input rows r-1..r+1)
    or, in the encoder's downsamplers, stride 2 with diffusers' padding of one row and column after the image
    only (output row r reads input rows 2r..2r+2); `strips` maps output rows to the input rows they read.
    """

    graph = TILED_GRAPH
    role = "decoder"
    error = TiledDecodeError
    fallback = "decode without --low-memory"
    kinds = {"resnet": ("conv1", "conv2", "shortcut"), "upsample": ("conv",), "output": ("conv",)}
    optional = ("shortcut",)

    def __init__(
        self,
        root: Path,
        entry: dict,
        open_session: Callable[[Path], object],
        strip_elements: int = STRIP_ELEMENTS,
        release: Callable[[], None] = lambda: None,
    ):
        self.root = Path(root)
        self.open_session = open_session
        self.strip_elements = strip_elements
        self.release = release
        try:
            self.groups = int(entry["groups"])
            self.eps = float(entry["eps"])
            self.file = inside(self.root, entry["file"])
            self.ops = [dict(op) for op in entry["ops"]]
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{self.graph} entry of the manifest is incomplete: {e}") from None
        for op in self.ops:
            if op.get("kind") not in self.kinds:
                raise BundleError(f"{self.graph}: unknown layer kind {op.get('kind')!r}")
            for key in self.kinds[op["kind"]]:
                if key in self.optional and key not in op:
                    continue
                op[key] = inside(self.root, op[key])
                if not op[key].is_file():
                    raise BundleError(f"bundle file missing: {op[key].relative_to(self.root)}")

    def to_float16(self, values: np.ndarray) -> np.ndarray:
        if not np.isfinite(values).all() or np.abs(values).max() > np.finfo(np.float16).max:
            raise self.error(f"{self.role} activations exceed float16's range; {self.fallback}")
        return values.astype(np.float16)

    def strips(self, source, out_channels: int, stride: int = 1):
        """(start, stop, low, high): output rows [start, stop) and the input rows [low, high) they read."""
        channels, height, width = source.shape
        rows = max(1, strip_rows(max(channels, out_channels), width, 1, self.strip_elements) // stride)
        out_height = height // stride
        for start in range(0, out_height, rows):
            stop = min(start + rows, out_height)
            if stride == 1:
                yield start, stop, max(start - HALO, 0), min(stop + HALO, height)
            else:  # the graph pads one zero row below: only the last strip reads it, as the untiled one does
                yield start, stop, stride * start, min(stride * stop + 1, height)

    def statistics(self, source) -> GroupStats:
        """GroupNorm sums of a whole source, strip by strip (an upsampler's output is computed for them)."""
        stats = GroupStats(source.shape[0], self.groups)
        for start, stop, _, _ in self.strips(source, source.shape[0]):
            stats.add(self.checked(source.rows(start, stop), type(source).__name__))
        return stats

    def checked(self, y: np.ndarray, where: str) -> np.ndarray:
        if not np.isfinite(y).all():
            raise self.error(f"{where}: {self.role} activations exceed float16's range")
        return y

    def run_layer(self, path: Path, source, stats, residual=None, side=None, final=False, stride=1):
        """Run one layer graph over strips of `source`.

        With `stats` (the input's GroupNorm sums) the graph is a norm-conv graph and gets the normalisation;
        without, a plain convolution (conv_in, a downsampler). Returns (output, the output's GroupNorm sums,
        side output). With `residual` (O, H, W) the graph adds it and the output is written over it. `side`
        is a shortcut graph (or "copy") run on the same strips, whose output is stored too.
        """
        session = self.open_session(path)
        channels, height, width = source.shape
        out_channels = session.get_outputs()[0].shape[1]
        if not isinstance(out_channels, int):
            raise BundleError(f"{path.name}: output channels must be fixed in the graph")
        out_shape = (out_channels, height // stride, width // stride)
        normalisation = {}  # a plain convolution (no stats) has no norm before it
        if stats is not None:
            normalisation["mean"], normalisation["rstd"] = stats.normalisation(self.eps)
        out = residual if residual is not None else np.empty(out_shape, np.float32 if final else np.float16)
        out_stats = None if final else GroupStats(out_channels, self.groups)
        side_session = self.open_session(side) if isinstance(side, Path) else None
        side_out = None if side is None else np.empty(out_shape, np.float16)
        for start, stop, low, high in self.strips(source, out_channels, stride):
            strip = source.rows(low, high)
            feed = {"x": strip[None], **normalisation}
            if residual is not None:
                # Rows above `start` were already overwritten: they only reach output rows that are cropped.
                feed["residual"] = residual[None, :, low:high]
            first = start - low // stride  # the graph's output row of output row `start`
            y = session.run(None, feed)[0][0, :, first : first + stop - start]
            out[:, start:stop] = y if final else self.checked(y, path.name)
            if out_stats is not None:
                out_stats.add(y)
            if side_session is not None:
                side_out[:, start:stop] = side_session.run(None, {"x": strip[None, :, start - low : stop - low]})[0][0]
            elif side_out is not None:
                side_out[:, start:stop] = strip[:, start - low : stop - low]
        return out, out_stats, side_out


class TiledDecoder(LayerRunner):
    """tokens (B, h, w) -> images (B, 3, 16h, 16w) float32 in [0, 1], one band of rows at a time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stem_file = self.file
        if not self.ops or self.ops[-1]["kind"] != "output":
            raise BundleError(f"{TILED_GRAPH}: the program must end with the output layer")

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        session = self.open_session(self.stem_file)
        features = session.run(["features"], {"tokens": tokens.astype(np.int64)})[0]  # (B, C, h, w) float32
        del session
        images = [self.decode_features(f) for f in features]
        return np.stack(images)

    def decode_features(self, features: np.ndarray) -> np.ndarray:
        """One image's stem output (C, h, w) float32 -> pixels (3, H, W) float32."""
        x = Stored(self.to_float16(features))
        stats = self.statistics(x)
        for op in self.ops:
            if op["kind"] == "upsample":
                x = Upsampled(x, self.open_session(op["conv"]))
                stats = self.statistics(x)
                continue
            if op["kind"] == "output":
                return self.run_layer(op["conv"], x, stats, final=True)[0]
            # A ResNet block. Its residual: the input itself when it is stored (the output overwrites it),
            # else (an upsampler's output, or channels change) stored during the first convolution's pass.
            side = op.get("shortcut", "copy" if isinstance(x, Upsampled) else None)
            h, h_stats, residual = self.run_layer(op["conv1"], x, stats, side=side)
            if residual is None:
                residual = x.array
            x = None  # done with the input (an upsampler's: its session and the level below go too)
            self.release()
            out, stats, _ = self.run_layer(op["conv2"], Stored(h), h_stats, residual=residual)
            x, h = Stored(out), None
            self.release()
        raise AssertionError("unreachable: the program ends with the output layer")
