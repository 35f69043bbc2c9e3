"""Export of the tiled VQ decoder and encoder (run by `tiled_decoder.py` and `tiled_encoder.py`): one graph
for the part that runs whole at token resolution, and one small graph per full-resolution convolution.

The decoder's stem (codebook lookup, post-quant conv, conv_in, mid block) and the encoder's tail (last down
block, mid block, conv_norm_out, SiLU, conv_out, quant_conv, nearest codebook entry) are exported from
PyTorch like every other graph (`graphs.export_graph`). The other layers become one ONNX graph per
convolution, written here from the module's weights with `onnx.helper`: each graph is the GroupNorm (with
the statistics as inputs), SiLU and 3x3 convolution of one ResNet half, plus the residual for the second
half, and the 1x1 shortcut where channels change; the decoder's upsamplers are nearest 2x + 3x3
convolution and its last graph is conv_norm_out, SiLU, conv_out and the clip to [0, 1]; the encoder's
conv_in and downsamplers (pad right and bottom by one, 3x3 convolution of stride 2) are a convolution alone.
Weights are stored in float16 (activations between layers are float16 too) and computed in float32.

Only the structure diffusers' `VQModel` has is accepted (UpDecoderBlock2D and DownEncoderBlock2D blocks of
ResnetBlock2D with GroupNorm and SiLU, Downsample2D with padding 0); anything else raises, rather than
tiling a model this code does not know.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from meissonic_edge.errors import MeissonicError
from meissonic_edge.export.graphs import OPSET, nearest_codebook_entry
from meissonic_edge.runtime.tiled_decoder import TILED_GRAPH
from meissonic_edge.runtime.tiled_encoder import TILED_ENCODER_GRAPH

IR_VERSION = 10  # onnxruntime >= 1.18 reads it


class TiledExportError(MeissonicError):
    """The VQ decoder has a layer the tiled decoder does not implement."""


class VQDecoderStem(nn.Module):
    """tokens (B, h, w) -> features (B, C, h, w): the decoder up to its first up block, at token resolution."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, tokens):
        batch, height, width = tokens.shape
        vq = self.vqvae
        quant = vq.quantize.get_codebook_entry(tokens, (batch, height, width, vq.config.latent_channels))
        x = vq.decoder.conv_in(vq.post_quant_conv(quant))  # (B, C, h, w)
        return vq.decoder.mid_block(x, None)


# ----------------------------------------------------------------------------------------------- structure


def require_structure(vqvae) -> tuple[int, float]:
    """Check that every up-block layer is one the tiled decoder implements; return GroupNorm (groups, eps)."""
    decoder = vqvae.decoder
    if vqvae.config.norm_type != "group":
        raise TiledExportError(f"VQ norm_type {vqvae.config.norm_type!r}: tiling supports 'group' only")
    norms = [decoder.conv_norm_out]
    for i, block in enumerate(decoder.up_blocks):
        norms += require_resnets(block, f"up_blocks.{i}")
        for upsampler in block.upsamplers or []:
            if not upsampler.use_conv or upsampler.use_conv_transpose or upsampler.norm is not None:
                raise TiledExportError(f"up_blocks.{i}: upsampler other than nearest 2x + convolution")
            require_conv3x3(upsampler.conv, f"up_blocks.{i}.upsamplers")
    require_conv3x3(decoder.conv_out, "conv_out")
    return one_norm_setting(norms, "decoder")


def require_encoder_structure(vqvae) -> tuple[int, float]:
    """Check that every layer before the encoder's last down block is one the tiled encoder implements: each
    of those blocks ResNet blocks then one downsampler (diffusers' Downsample2D with padding 0: pad right and
    bottom by one, 3x3 convolution of stride 2). Return GroupNorm (groups, eps). The last block, the mid block
    and the output layers run whole in the tail graph, exported from PyTorch: any structure goes there."""
    encoder = vqvae.encoder
    require_conv3x3(encoder.conv_in, "encoder.conv_in")
    if len(encoder.down_blocks) < 2:
        raise TiledExportError("the encoder has one down block: nothing runs at full resolution to tile")
    norms = []
    for i, block in enumerate(encoder.down_blocks[:-1]):
        where = f"encoder.down_blocks.{i}"
        norms += require_resnets(block, where)
        downsamplers = list(block.downsamplers or [])
        if len(downsamplers) != 1:
            raise TiledExportError(f"{where}: {len(downsamplers)} downsamplers, the tiled encoder needs one")
        downsampler, conv = downsamplers[0], downsamplers[0].conv
        if (
            not downsampler.use_conv
            or downsampler.padding != 0
            or downsampler.norm is not None
            or not isinstance(conv, nn.Conv2d)
            or (conv.kernel_size, conv.stride, conv.padding, conv.dilation) != ((3, 3), (2, 2), (0, 0), (1, 1))
            or conv.groups != 1
            or conv.bias is None
        ):
            raise TiledExportError(f"{where}: a downsampler other than pad (0, 1, 0, 1) + 3x3 stride-2 convolution")
    return one_norm_setting(norms, "encoder")


def require_resnets(block, where: str) -> list:
    """Check a block's ResNet blocks (GroupNorm, SiLU, 3x3 convolutions, 1x1 shortcut); return their norms."""
    if getattr(block, "attentions", None):
        raise TiledExportError(f"{where} has attention layers: tiling needs convolutions only")
    norms = []
    for j, resnet in enumerate(block.resnets):
        name = f"{where}.resnets.{j}"
        if resnet.time_emb_proj is not None or resnet.upsample is not None or resnet.downsample is not None:
            raise TiledExportError(f"{name}: time embedding or resampling inside the ResNet block")
        if resnet.output_scale_factor != 1 or not isinstance(resnet.nonlinearity, nn.SiLU):
            raise TiledExportError(f"{name}: output scale or activation other than 1 and SiLU")
        for conv in (resnet.conv1, resnet.conv2):
            require_conv3x3(conv, name)
        shortcut = resnet.conv_shortcut
        if shortcut is not None and (shortcut.kernel_size != (1, 1) or shortcut.bias is None):
            raise TiledExportError(f"{name}: a shortcut other than a 1x1 convolution with bias")
        norms += [resnet.norm1, resnet.norm2]
    return norms


def one_norm_setting(norms: list, what: str) -> tuple[int, float]:
    settings = {(n.num_groups, n.eps) for n in norms if isinstance(n, nn.GroupNorm) and n.affine}
    if len(settings) != 1 or not all(isinstance(n, nn.GroupNorm) for n in norms):
        raise TiledExportError(f"the {what}'s norms are not one GroupNorm setting (groups, eps) with weights")
    return settings.pop()


def require_conv3x3(conv, where: str) -> None:
    if (
        not isinstance(conv, nn.Conv2d)
        or conv.kernel_size != (3, 3)
        or conv.padding != (1, 1)
        or conv.stride != (1, 1)
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or conv.bias is None
    ):
        raise TiledExportError(f"{where}: a convolution other than 3x3, stride 1, padding 1, with bias")


# ----------------------------------------------------------------------------------------------- graphs


class LayerGraph:
    """A small ONNX graph under construction; node names are the module's, as in the other graphs."""

    def __init__(self, scope: str):
        self.scope = scope
        self.nodes, self.initializers, self.inputs = [], [], []

    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        full = f"{self.scope}.{name}"
        self.initializers.append(numpy_helper.from_array(value, full))
        return full

    def node(self, op: str, inputs: list[str], **attributes) -> str:
        from onnx import helper

        name = f"/{self.scope}/{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attributes))
        return name

    def input(self, name: str, elem_type: int, shape: list) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def conv(self, x: str, conv: nn.Conv2d, name: str, pads: list[int] | None = None) -> str:
        """Conv with float16-stored weights, computed in float32 (onnxruntime folds the Cast at load).

        `pads` (top, left, bottom, right) replaces the module's symmetric padding."""
        from onnx import TensorProto

        weight = self.constant(f"{name}.weight", conv.weight.detach().numpy().astype(np.float16))
        bias = self.constant(f"{name}.bias", conv.bias.detach().numpy().astype(np.float32))
        weight32 = self.node("Cast", [weight], to=TensorProto.FLOAT)
        pads = pads or [conv.padding[0]] * 4
        return self.node(
            "Conv", [x, weight32, bias], pads=pads, kernel_shape=list(conv.kernel_size), strides=list(conv.stride)
        )

    def model(self, output: str, elem_type: int, channels: int):
        from onnx import checker, helper

        out = helper.make_tensor_value_info("y", elem_type, [1, channels, "out_rows", "out_width"])
        self.nodes.append(helper.make_node("Identity", [output], ["y"], name=f"/{self.scope}/Identity"))
        graph = helper.make_graph(self.nodes, self.scope, self.inputs, [out], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        component = {"decoder": TILED_GRAPH, "encoder": TILED_ENCODER_GRAPH}[self.scope.split(".")[0]]
        model.metadata_props.add(key="meissonic_edge.component", value=component)
        checker.check_model(model)
        return model


def norm_conv_graph(scope: str, norm: nn.GroupNorm, conv: nn.Conv2d, residual=False, final=False):
    """GroupNorm (statistics given) -> SiLU -> conv [+ residual] [-> clip to [0, 1]]."""
    from onnx import TensorProto

    g = LayerGraph(scope)
    channels = conv.in_channels
    x = g.input("x", TensorProto.FLOAT16, [1, channels, "rows", "width"])
    mean = g.input("mean", TensorProto.FLOAT, [1, channels, 1, 1])
    rstd = g.input("rstd", TensorProto.FLOAT, [1, channels, 1, 1])
    gamma = g.constant("norm.weight", norm.weight.detach().numpy().reshape(1, -1, 1, 1).astype(np.float32))
    beta = g.constant("norm.bias", norm.bias.detach().numpy().reshape(1, -1, 1, 1).astype(np.float32))
    scale = g.node("Mul", [rstd, gamma])  # per channel: gamma / std
    shift = g.node("Sub", [beta, g.node("Mul", [mean, scale])])
    normed = g.node("Add", [g.node("Mul", [g.node("Cast", [x], to=TensorProto.FLOAT), scale]), shift])
    y = g.conv(g.node("Mul", [normed, g.node("Sigmoid", [normed])]), conv, "conv")
    if residual:
        r = g.input("residual", TensorProto.FLOAT16, [1, conv.out_channels, "rows", "width"])
        y = g.node("Add", [y, g.node("Cast", [r], to=TensorProto.FLOAT)])
    if final:
        low = g.constant("clip_min", np.array(0.0, np.float32))
        high = g.constant("clip_max", np.array(1.0, np.float32))
        return g.model(g.node("Clip", [y, low, high]), TensorProto.FLOAT, conv.out_channels)
    return g.model(g.node("Cast", [y], to=TensorProto.FLOAT16), TensorProto.FLOAT16, conv.out_channels)


def conv_graph(scope: str, conv: nn.Conv2d, pads: list[int] | None = None, float32_input: bool = False):
    """A convolution alone: a ResNet block's 1x1 shortcut (when its channels change), the encoder's conv_in
    (on float32 pixels), a downsampler (stride 2, `pads` (0, 0, 1, 1): diffusers pads right and bottom)."""
    from onnx import TensorProto

    g = LayerGraph(scope)
    elem_type = TensorProto.FLOAT if float32_input else TensorProto.FLOAT16
    x = g.input("x", elem_type, [1, conv.in_channels, "rows", "width"])
    y = g.conv(x if float32_input else g.node("Cast", [x], to=TensorProto.FLOAT), conv, "conv", pads)
    return g.model(g.node("Cast", [y], to=TensorProto.FLOAT16), TensorProto.FLOAT16, conv.out_channels)


def upsample_graph(scope: str, conv: nn.Conv2d):
    """Nearest 2x (torch's F.interpolate: source index floor(i / 2)) -> 3x3 conv."""
    from onnx import TensorProto

    g = LayerGraph(scope)
    x = g.input("x", TensorProto.FLOAT16, [1, conv.in_channels, "rows", "width"])
    scales = g.constant("scales", np.array([1.0, 1.0, 2.0, 2.0], np.float32))
    up = g.node(
        "Resize",
        [g.node("Cast", [x], to=TensorProto.FLOAT), "", scales],
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )
    y = g.conv(up, conv, "conv")
    return g.model(g.node("Cast", [y], to=TensorProto.FLOAT16), TensorProto.FLOAT16, conv.out_channels)


def resnet_op(resnet, scope: str, save) -> dict:
    """A ResNet block's layer graphs, saved with `save(model, scope)`: its two norm-conv halves, and the 1x1
    shortcut where channels change."""
    conv1 = norm_conv_graph(f"{scope}.conv1", resnet.norm1, resnet.conv1)
    conv2 = norm_conv_graph(f"{scope}.conv2", resnet.norm2, resnet.conv2, residual=True)
    op = {"kind": "resnet", "conv1": save(conv1, scope + ".conv1"), "conv2": save(conv2, scope + ".conv2")}
    if resnet.conv_shortcut is not None:
        op["shortcut"] = save(conv_graph(f"{scope}.conv_shortcut", resnet.conv_shortcut), scope + ".conv_shortcut")
    return op


def graph_saver(out_dir: Path, folder: str):
    """`save(model, scope)`: writes a layer graph to out_dir/folder/scope.onnx, returns its bundle path."""
    import onnx

    (out_dir / folder).mkdir(exist_ok=True)

    def save(model, scope: str) -> str:
        relative = f"{folder}/{scope}.onnx"
        onnx.save(model, str(out_dir / relative))
        return relative

    return save


def write_layer_graphs(vqvae, out_dir: Path) -> dict:
    """Write one graph per up-block convolution into out_dir/vq_decoder_tiled; return the manifest entry
    (without the stem's file, which the caller exports)."""

    groups, eps = require_structure(vqvae)
    save = graph_saver(out_dir, TILED_GRAPH)
    decoder = vqvae.decoder

    ops = []
    with torch.no_grad():
        for i, block in enumerate(decoder.up_blocks):
            for j, resnet in enumerate(block.resnets):
                ops.append(resnet_op(resnet, f"decoder.up_blocks.{i}.resnets.{j}", save))
            for k, upsampler in enumerate(block.upsamplers or []):
                scope = f"decoder.up_blocks.{i}.upsamplers.{k}"
                ops.append({"kind": "upsample", "conv": save(upsample_graph(scope, upsampler.conv), scope)})
        out = norm_conv_graph("decoder.conv_out", decoder.conv_norm_out, decoder.conv_out, final=True)
        ops.append({"kind": "output", "conv": save(out, "decoder.conv_out")})
    return {"groups": groups, "eps": eps, "ops": ops}


# ----------------------------------------------------------------------------------------------- the encoder


class VQEncoderTail(nn.Module):
    """features (B, C, h, w) -> tokens (B, h, w): the encoder from its last down block on, at token resolution
    (the last down block, the mid block, conv_norm_out, SiLU, conv_out, quant_conv, the codebook)."""

    def __init__(self, vqvae):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, features):
        vq, encoder = self.vqvae, self.vqvae.encoder
        x = encoder.mid_block(encoder.down_blocks[-1](features))  # (B, C, h, w)
        x = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(x)))
        return nearest_codebook_entry(vq, vq.quant_conv(x))


def write_encoder_layer_graphs(vqvae, out_dir: Path) -> dict:
    """Write one graph per convolution before the encoder's last down block into out_dir/vq_encoder_tiled;
    return the manifest entry (without the tail's file, which the caller exports)."""

    groups, eps = require_encoder_structure(vqvae)
    save = graph_saver(out_dir, TILED_ENCODER_GRAPH)
    encoder = vqvae.encoder

    with torch.no_grad():
        conv_in = conv_graph("encoder.conv_in", encoder.conv_in, float32_input=True)  # on the image's pixels
        ops = [{"kind": "input", "conv": save(conv_in, "encoder.conv_in")}]
        for i, block in enumerate(encoder.down_blocks[:-1]):
            for j, resnet in enumerate(block.resnets):
                ops.append(resnet_op(resnet, f"encoder.down_blocks.{i}.resnets.{j}", save))
            scope = f"encoder.down_blocks.{i}.downsamplers.0"
            down = conv_graph(scope, block.downsamplers[0].conv, pads=[0, 0, 1, 1])  # (top, left, bottom, right)
            ops.append({"kind": "downsample", "conv": save(down, scope)})
    return {"groups": groups, "eps": eps, "ops": ops}
