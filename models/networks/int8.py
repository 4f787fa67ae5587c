"""SpotNet in 8-bit integers on the CPU: the same network, about 2x faster to run.

Every 3 x 3 and 1 x 1 convolution of one head's branch runs as an int8 convolution
(oneDNN's VNNI kernels) with its batch norm folded in; the head's last 1 x 1 layer,
which gives the heat logit, the offsets and their sigma, stays in float32 so that
scores and sub-pixel positions keep their resolution.  Activations are quantized per
tensor (unsigned 8 bit) over a range measured on calibration images (``calibrate``),
weights per output channel (signed 8 bit, symmetric), as PyTorch's own post-training
quantization does; ``tests/test_int8.py`` checks this against PyTorch's FX flow on the
same ranges.

Integer convolutions sum exactly, so the output is the same on any number of threads.
A model's ranges are stored beside its weights (``int8_ranges`` in its run folder's
``metrics.json``, written by `factory train`); they are data (JSON numbers), never code.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import normalize_images, pad_to_multiple

ENGINE = "onednn"  # PyTorch's quantized engine with oneDNN's int8 (VNNI) kernels
CALIBRATION_IMAGES = 64  # images of each validation store whose activations set the ranges
# Pixels per forward pass.  oneDNN's int8 kernels run 20-25 % cheaper per frame in batches
# than a frame at a time, where float32 gains nothing.  8 frames of 256 x 256 px (2 of
# 512 x 512) ran 5 - 20 % faster per frame than 16 (4) here, in 10 alternating rounds of
# each, and than 4 (1).  The integer layers sum exactly and the float32 last layer is a
# product per pixel, so a frame's output is the same in any batch (tests/test_int8.py).
PIXELS_PER_BATCH = 2**19


def available(device: str = "cpu") -> bool:
    """Whether int8 inference can run here: the CPU, with PyTorch's oneDNN engine."""
    return device == "cpu" and ENGINE in torch.backends.quantized.supported_engines


@contextmanager
def _quiet():
    # PyTorch announces that its quantized tensors will move to the torchao package; the
    # pinned release (pyproject.toml) has them, and ``available`` says where they run.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        yield


def _qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of unsigned 8-bit values over [lo, hi] (zero always exact),
    as PyTorch's MinMaxObserver computes them."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, torch.finfo(torch.float32).eps)
    zero = min(255, max(0, int(round(-lo / scale))))
    return float(scale), zero


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A convolution's weight and bias with the (inference-mode) batch norm after it folded in."""
    w = conv.weight.detach().float()
    b = conv.bias.detach().float() if conv.bias is not None else None
    if bn is None:
        return w, b
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    b0 = b if b is not None else torch.zeros_like(bn.running_mean)
    return w * k.view(-1, 1, 1, 1), bn.bias.detach() + (b0 - bn.running_mean) * k


class _Layers:
    """The branch of one head as named convolutions: (weight, bias, padding, dilation)."""

    def __init__(self, model: nn.Module, head: int):
        unet = model.unet
        self.convs: dict[str, tuple] = {}
        decoder = unet.up if head == 0 or model.branch == "head" else model.extra_decoders[head - 1]
        blocks = [("stem", unet.stem), *((f"down{i}", b) for i, b in enumerate(unet.down)),
                  *((f"mid{i}", b) for i, b in enumerate(unet.mid)), *((f"up{i}", b) for i, b in enumerate(decoder))]
        for name, block in blocks:
            if not isinstance(block.se, nn.Identity):
                raise ValueError("int8 inference does not cover squeeze-excitation blocks")
            if not isinstance(block.body[0][1], nn.BatchNorm2d):
                raise ValueError("int8 inference needs batch norm (folded into the convolutions)")
            c1, c2 = block.body[0][0], block.body[1]
            self.convs[f"{name}.1"] = (*_folded(c1, block.body[0][1]), c1.padding, c1.dilation)
            self.convs[f"{name}.2"] = (*_folded(c2, block.body[2]), c2.padding, c2.dilation)
            if not isinstance(block.skip, nn.Identity):
                self.convs[f"{name}.skip"] = (*_folded(block.skip, None), (0, 0), (1, 1))
        h = model.head if head == 0 else model.extra_heads[head - 1]
        self.convs["head"] = (*_folded(h[0], None), h[0].padding, h[0].dilation)
        self.last = h[2]  # float32: the heat logit, offsets and log sigma
        # A head short of full resolution gives each of its pixels' 2 x 2 pixels (a pixel shuffle).
        self.stride = model.branch_stride if head else 1
        self.depth = len(unet.down)
        self.mids = len(unet.mid)
        self.ups = len(decoder)
        self.multiple = unet.multiple
        # Each decoder level concatenates the level below (upsampled) and the encoder's
        # skip.  The two and the concatenation share one range, as in PyTorch's own
        # quantization: the concatenation then copies 8-bit values instead of
        # requantizing them (0.8 ms of a 256 x 256 px frame's 9 here).
        encoder = ["stem", *(f"down{i}" for i in range(self.depth))]
        below = [f"mid{self.mids - 1}" if self.mids else encoder[-1], *(f"up{i}" for i in range(self.ups - 1))]
        self.shared = [(f"up{i}.in", below[i], encoder[-2 - i]) for i in range(self.ups)]
        # Every activation with a range: the input, each convolution, block and concatenation.
        self.activations = ["input", *self.convs, *(n for n, _ in blocks), *(s[0] for s in self.shared)]

    def run(self, x: torch.Tensor, ops) -> torch.Tensor:
        """The branch's forward pass with ``ops`` doing the arithmetic (float32 while
        calibrating, int8 after): normalised, padded images in, the head's 4 channels out."""
        x = ops.input(x)
        skips = [self._block("stem", x, ops)]
        for i in range(self.depth):
            skips.append(self._block(f"down{i}", ops.pool(skips[-1]), ops))
        y = skips.pop()
        for i in range(self.mids):
            y = self._block(f"mid{i}", y, ops)
        for i in range(self.ups):
            y = self._block(f"up{i}", ops.up_cat(y, skips.pop(), f"up{i}.in"), ops)
        out = self.last(ops.output(ops.conv("head", y, relu=True)))
        return F.pixel_shuffle(out, self.stride) if self.stride > 1 else out

    def _block(self, name: str, x, ops):
        h = ops.conv(f"{name}.1", x, relu=True)
        h = ops.conv(f"{name}.2", h)
        s = ops.conv(f"{name}.skip", x) if f"{name}.skip" in self.convs else x
        return ops.add_relu(h, s, name)


class _Calibrate:
    """float32 arithmetic that records each activation's range."""

    def __init__(self, layers: _Layers):
        self.layers = layers
        self.ranges: dict[str, list[float]] = {}

    def _seen(self, name, t):
        lo, hi = float(t.min()), float(t.max())
        r = self.ranges.setdefault(name, [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return t

    def input(self, x):
        return self._seen("input", x)

    def conv(self, name, x, relu=False):
        w, b, pad, dil = self.layers.convs[name]
        y = F.conv2d(x, w, b, padding=pad, dilation=dil)
        return self._seen(name, F.relu(y) if relu else y)

    def add_relu(self, a, b, name):
        return self._seen(name, F.relu(a + b))

    def pool(self, x):
        return F.max_pool2d(x, 2)

    def up_cat(self, y, skip, name):
        """The level below upsampled to the skip's size (nearest), then both concatenated."""
        return self._seen(name, torch.cat([F.interpolate(y, size=skip.shape[-2:], mode="nearest"), skip], 1))

    def output(self, x):
        return x


class _Int8:
    """Int8 arithmetic with PyTorch's quantized operators and fixed ranges."""

    def __init__(self, layers: _Layers, ranges: dict[str, list[float]]):
        torch.backends.quantized.engine = ENGINE  # the packed weights are the engine's
        ranges = dict(ranges)
        for names in layers.shared:
            both = [min(ranges[n][0] for n in names), max(ranges[n][1] for n in names)]
            ranges.update({n: both for n in names})
        self.q = {name: _qparams(*r) for name, r in ranges.items()}
        self.packed = {}
        for name, (w, b, pad, dil) in layers.convs.items():
            amax = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12)
            scales = (amax / 127.5).double()  # symmetric per channel, as PyTorch's observer
            with _quiet():
                wq = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
            self.packed[name] = torch.ops.quantized.conv2d_prepack(wq, b, [1, 1], list(pad), list(dil), 1)

    def input(self, x):
        s, z = self.q["input"]
        with _quiet():
            return torch.quantize_per_tensor(x, s, z, torch.quint8)

    def conv(self, name, x, relu=False):
        s, z = self.q[name]
        op = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d
        return op(x, self.packed[name], s, z)

    def add_relu(self, a, b, name):
        return torch.ops.quantized.add_relu(a, b, *self.q[name])

    # The two below move 8-bit codes and compute nothing, yet PyTorch's quantized max
    # pool, upsampling and cat took a third of a 256 x 256 px frame's time (2 of 7 ms
    # here).  On the codes, as uint8 tensors, the same bytes come 2.5 - 7x faster: a max
    # pool commutes with the monotone map from code to value, and the concatenation's
    # inputs share its range (``_Layers.shared``), so it copies codes unchanged.  Where a
    # shape or a range does not allow it, PyTorch's operators run (tests/test_int8.py
    # checks both ways against them).

    def pool(self, x):
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            return F.max_pool2d(x, 2)
        out = _empty_quantized((b, c, h // 2, w // 2), x.q_scale(), x.q_zero_point())
        u = _codes(x)
        rows = torch.maximum(u[:, :, 0::2], u[:, :, 1::2])
        torch.maximum(rows[..., 0::2], rows[..., 1::2], out=_codes(out))
        return out

    def up_cat(self, y, skip, name):
        s, z = self.q[name]
        (b, c, h, w), (hs, ws) = y.shape, skip.shape[-2:]
        if (hs, ws) != (2 * h, 2 * w) or any((t.q_scale(), t.q_zero_point()) != (s, z) for t in (y, skip)):
            return torch.ops.quantized.cat([F.interpolate(y, size=(hs, ws), mode="nearest"), skip], 1, s, z)
        # Nearest 2x upsampling written straight into the output's first channels (pixel
        # by pixel in memory: channels last), each pixel to 2 columns, then each row twice.
        # The codes move as words of up to 8 bytes (2x faster at full resolution than
        # byte by byte), as many as divide both channel counts and both inputs' offsets,
        # where both inputs are channels last (a pixel's channels side by side).
        out = _empty_quantized((b, c + skip.shape[1], hs, ws), s, z)
        words = y.stride(1) == skip.stride(1) == 1
        k = next(k for k in _WORDS if k == 1 or words and all(
            n % k == 0 for n in (c, skip.shape[1], y.storage_offset(), skip.storage_offset())))
        o = _codes(out).permute(0, 2, 3, 1).view(_WORDS[k])  # (B, H, W, C / k), contiguous
        quads = o.view(b, h, 2, w, 2, o.shape[-1])
        small = _codes(y).permute(0, 2, 3, 1).view(_WORDS[k])
        quads[:, :, 0, :, 0, :c // k] = small
        quads[:, :, 0, :, 1, :c // k] = small
        quads[:, :, 1] = quads[:, :, 0]  # whole rows: faster than their first channels alone
        o[..., c // k:] = _codes(skip).permute(0, 2, 3, 1).view(_WORDS[k])
        return out

    def output(self, x):
        return x.dequantize()


_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}  # bytes -> an integer type of that size


def _codes(q: torch.Tensor) -> torch.Tensor:
    """The 8-bit codes of a quantized tensor as a uint8 tensor sharing its memory
    (``int_repr`` would copy them): writing to it writes to ``q``."""
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


def _empty_quantized(shape: tuple[int, ...], scale: float, zero: int) -> torch.Tensor:
    """An unfilled unsigned 8-bit quantized tensor, channels last (as oneDNN's convolutions give)."""
    with _quiet():
        return torch._empty_affine_quantized(shape, scale=scale, zero_point=zero, dtype=torch.quint8,
                                             memory_format=torch.channels_last)


def _prepare(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    x, hw = pad_to_multiple(normalize_images(images.float()), multiple)
    return x.contiguous(memory_format=torch.channels_last), hw


@torch.no_grad()
def calibrate(model: nn.Module, head: int, images: torch.Tensor) -> dict[str, list[float]]:
    """Each activation's [min, max] over ``images`` (B, 1, H, W) counts, for ``Int8Head``."""
    layers = _Layers(model.eval(), head)
    ops = _Calibrate(layers)
    x, _ = _prepare(images.cpu(), layers.multiple)
    for i in range(0, len(x), 8):
        layers.run(x[i:i + 8], ops)
    return ops.ranges


def merge(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
    """The ranges covering both ``a`` and ``b``."""
    return {n: [min(a[n][0], b[n][0]), max(a[n][1], b[n][1])] if n in a and n in b else list(a.get(n) or b[n])
            for n in {**a, **b}}


class Int8Head(nn.Module):
    """Head ``head`` of a SpotNet in int8: ``forward(images, head)`` gives what
    ``model(images, head)`` gives, from 8-bit arithmetic (``spotnet.predict`` takes it
    in the network's place).

    Parameters
    ----------
    model : SpotNet
        The trained network (inference mode; batch norm is folded in).
    head : int
        Which output head.
    ranges : dict
        ``calibrate``'s activation ranges for that head.
    """

    def __init__(self, model: nn.Module, head: int, ranges: dict[str, list[float]]):
        super().__init__()
        self._layers = _Layers(model.eval(), head)
        missing = [n for n in self._layers.activations if n not in ranges]
        if missing:
            raise ValueError(f"int8 ranges lack {', '.join(missing[:3])}")
        bad = [n for n, r in ranges.items() if len(r) != 2 or not all(math.isfinite(v) for v in r) or r[0] > r[1]]
        if bad:
            raise ValueError(f"int8 range of {bad[0]} is not a finite [min, max]")
        self._ops = _Int8(self._layers, ranges)
        self.last = self._layers.last
        self.head = head
        self.flip_tta = False
        self.pixels_per_batch = PIXELS_PER_BATCH

    @torch.no_grad()
    def forward(self, images: torch.Tensor, head: int | None = None) -> torch.Tensor:
        if head not in (None, self.head):
            raise ValueError(f"this is head {self.head} in int8, not head {head}")
        x, (h, w) = _prepare(images, self._layers.multiple)
        return self._layers.run(x, self._ops)[..., :h, :w].contiguous()
