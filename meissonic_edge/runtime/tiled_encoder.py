"""Tiled VQ encoding: the encoder run a band of rows at a time, so no full-resolution float32 activation exists.

Editing encodes the input image first (`editing.py`). The VQ encoder's memory is in its first levels: at
1024x1024 one activation of the first level is 128 x 1024 x 1024 floats (512 MB), and the untiled graph
holds several at once (3.6 GB measured, against ~1.1 GB for every other phase of a low-memory generation).
Plain tiles cannot fix this exactly, for the reason the decoder's cannot (`tiled_decoder.py`): every
GroupNorm normalises with statistics of the whole image.

So the encoder mirrors the tiled decoder, run in the other direction:

- conv_in and every down block but the last run layer by layer, each convolution over horizontal strips of
  its input with the rows of context it needs: one row above and below for a 3x3 convolution, and for a
  downsampler (diffusers pads one zero row and column after the image, then a 3x3 convolution of stride 2)
  input rows 2r..2r+2 for output row r;
- a layer's output is kept in float16, and the GroupNorm statistics the next layer needs (per group, over
  the whole image) are summed in float64 over the strips as they are written; the next layer normalises
  with them, as the untiled graph would;
- a ResNet block's second convolution adds the residual and writes its output over it, in place; when
  channels change, the 1x1 shortcut's output is stored as that residual, computed in the first pass;
- the tail (the last down block, the mid block, conv_norm_out, SiLU, conv_out, quant_conv and the nearest
  codebook entry) runs whole: after the last downsampler the activation is at token resolution (512 x 64 x 64
  at 1024 px in Meissonic, 8 MB in float32), and the mid block may hold attention, which strips cannot do.

Memory is then at most two activations of the first level in float16 (a ResNet block's input, which becomes
its residual and output, and its first convolution's output: 256 MB each at 1024x1024), plus one strip's
temporaries. Each layer is a tiny ONNX graph with its weights (`vq_encoder_tiled/`, written by
`export_tiled.py`); its session lives only while its layer runs. The strip runner is the decoder's
(`tiled_decoder.LayerRunner`).

The manifest's `vq_encoder_tiled` entry:

    {"file": "vq_encoder_tiled/tail.onnx", "groups": 32, "eps": 1e-6,
     "ops": [{"kind": "input", "conv": FILE},
             {"kind": "resnet", "conv1": FILE, "conv2": FILE[, "shortcut": FILE]}, ...,
             {"kind": "downsample", "conv": FILE}, ...]}

Graph interfaces (h rows of width w):
    input graph (conv_in):       x (1, 3, h, w) float32 pixels in [0, 1] -> y (1, C, h, w) float16
    norm-conv and shortcut graphs: as in the tiled decoder
    downsample graph:            x (1, C, h, w) float16 -> y (1, C, h // 2, w // 2) float16 (pads below, right)
    tail graph:                  features (B, C, h, w) float32 -> tokens (B, h, w) int64
"""

from __future__ import annotations

import numpy as np

from meissonic_edge.runtime.bundle import BundleError
from meissonic_edge.runtime.tiled_decoder import LayerRunner, Stored, TiledError

TILED_ENCODER_GRAPH = "vq_encoder_tiled"


class TiledEncodeError(TiledError):
    """The tiled encoder cannot encode this image (a bad program, or values float16 cannot hold)."""


class TiledEncoder(LayerRunner):
    """images (B, 3, H, W) float32 in [0, 1] -> tokens (B, H/16, W/16), one band of rows at a time."""

    graph = TILED_ENCODER_GRAPH
    role = "encoder"
    error = TiledEncodeError
    fallback = "edit without --low-memory"
    kinds = {"input": ("conv",), "resnet": ("conv1", "conv2", "shortcut"), "downsample": ("conv",)}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tail_file = self.file
        if not self.ops or self.ops[0]["kind"] != "input" or any(op["kind"] == "input" for op in self.ops[1:]):
            raise BundleError(f"{TILED_ENCODER_GRAPH}: the program must start with its one input layer")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        tokens = []
        for image in images:
            features = self.encode_features(image.astype(np.float32, copy=False))[None]  # (1, C, h, w) float32
            session = self.open_session(self.tail_file)
            tokens.append(session.run(["tokens"], {"features": features})[0][0])
            del session
        return np.stack(tokens)

    def encode_features(self, image: np.ndarray) -> np.ndarray:
        """One image (3, H, W) float32 -> the tail's input (C, h, w) float32, at token resolution."""
        x, stats = Stored(image), None
        for op in self.ops:
            if op["kind"] in ("input", "downsample"):  # a convolution alone: no norm before it
                out, stats, _ = self.run_layer(op["conv"], x, None, stride=1 if op["kind"] == "input" else 2)
                x, out = Stored(out), None  # the input goes: no name may keep an array alive
                self.release()
                continue
            # A ResNet block. Its residual: the input itself (the output overwrites it), or, when channels
            # change, the shortcut's output stored during the first convolution's pass.
            h, h_stats, residual = self.run_layer(op["conv1"], x, stats, side=op.get("shortcut"))
            if residual is None:
                residual = x.array
            x = None  # with a shortcut, the input is no longer needed
            self.release()
            out, stats, _ = self.run_layer(op["conv2"], Stored(h), h_stats, residual=residual)
            x, out, h, residual = Stored(out), None, None, None
            self.release()
        return x.array.astype(np.float32)
