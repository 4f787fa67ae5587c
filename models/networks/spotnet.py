"""SpotNet, the default model: a U-Net with a full-resolution centre-point head.

For every pixel it predicts a logit that a trajectory centroid lies in the pixel, the
centroid's sub-pixel offset (dx, dy) from the pixel centre, and a log standard
deviation of that offset.  Training uses CenterNet's penalty-reduced focal loss on a
Gaussian heat map and a Gaussian negative log-likelihood on the offsets, so ``sigma``
is a calibrated per-detection uncertainty in pixels.  Detections are the 3 x 3 local
maxima of the heat map.  Fully convolutional: any image size, any number of spots.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from factory.config import StrictModel
from loaders.augment import ALL_FLIPS, image_dims

from .blocks import UNet, normalize_images, pad_to_multiple

HEAT_SIGMA_PX = 1.0
LABEL = "SpotNet (ours)"
TRAIN_DEFAULTS: dict = {}
PIXELS_PER_BATCH = 2**16  # inference batches by image area: small batches stay in cache


class Params(StrictModel):
    """SpotNet's network parameters (``model_params`` of a training config)."""

    widths: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default=[32, 64, 128], min_length=2)
    se: bool = False  # squeeze-excitation in the U-Net blocks
    flip_tta: bool = True  # average the four flips at prediction (4x slower)
    # Output heads on the one backbone: 1, or 2 for `target: both` (head 0 the trajectory
    # centroid, head 1 the exposure-weighted position; set by the training config).
    heads: Literal[1, 2] = 1
    # Where the heads' branches part: after the decoder (each head its own 3 x 3 layer on
    # the shared features), or after the encoder (each head its own decoder too, so a
    # head can be trained on top of a frozen first one: `freeze` in the training config).
    branch: Literal["head", "decoder"] = "head"
    # With ``branch: decoder``: the resolution the other heads' decoders stop at.  2: one
    # level short of full resolution, each pixel there predicting the 2 x 2 pixels it
    # covers (the head's 16 outputs rearranged to 4 at full resolution, a pixel shuffle).
    # The full-resolution layers are most of a large frame's time (README, Inference).
    branch_stride: Literal[1, 2] = 1

    @model_validator(mode="after")
    def _stride_needs_own_decoder(self):
        check_branch_stride(self.branch, self.branch_stride)
        return self


def check_branch_stride(branch: str, branch_stride: int) -> None:
    """A head short of full resolution needs a decoder of its own (ValueError otherwise)."""
    if branch_stride not in (1, 2):
        raise ValueError(f"branch_stride must be 1 or 2, not {branch_stride}")
    if branch_stride == 2 and branch != "decoder":
        raise ValueError("branch_stride 2 needs branch: decoder (the other heads' own decoders)")


class SpotNet(nn.Module):
    def __init__(self, widths=(32, 64, 128), se: bool = False, flip_tta: bool = True, heads: int = 1,
                 branch: str = "head", branch_stride: int = 1):
        super().__init__()
        check_branch_stride(branch, branch_stride)
        self.flip_tta = flip_tta  # average over the four flips at inference
        self.heads = heads
        self.branch = branch
        self.branch_stride = branch_stride
        self.unet = UNet(1, tuple(widths), se=se)

        def head(c: int, stride: int = 1):
            # 4 outputs per full-resolution pixel: stride**2 per pixel of the features.
            h = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True),
                              nn.Conv2d(c, 4 * stride**2, 1))
            # Start from a low prior probability of a spot in each pixel (focal loss
            # practice); the heat logits are the first stride**2 outputs (pixel shuffle order).
            nn.init.constant_(h[-1].bias, 0.0)
            with torch.no_grad():
                h[-1].bias[:stride**2] = -math.log((1 - 0.01) / 0.01)
            return h

        # Each target has its own head on the shared features (its own 3 x 3 layer, so the
        # two offsets need not share one).
        self.head = head(self.unet.out_channels)
        levels = self.unet.depth - (1 if branch_stride == 2 else 0)  # stride 2: one level short
        self.extra_heads = nn.ModuleList([head(widths[self.unet.depth - levels], branch_stride)
                                          for _ in range(heads - 1)])
        self.extra_decoders = nn.ModuleList([self.unet.new_decoder(levels) for _ in range(heads - 1)
                                             if branch == "decoder"])
        # Channels-last convolutions run about 15% faster on the CPU (oneDNN) and on GPUs.
        self.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """(B, 1, H, W) counts -> (B, 4 * heads, H, W): per head heat logit, dx, dy, log
        sigma; with ``head``, that head's 4 channels only (its branch alone is run)."""
        x, (h, w) = pad_to_multiple(normalize_images(images), self.unet.multiple)
        heads = range(self.heads) if head is None else [head]
        if self.branch == "decoder":
            y, skips = self.unet.encode(x.contiguous(memory_format=torch.channels_last))
            feats = [self.unet.decode(y, skips, self.extra_decoders[k - 1] if k else None) for k in heads]
        else:
            feats = [self.unet(x.contiguous(memory_format=torch.channels_last))] * len(heads)
        outs = [self.head(f) if k == 0 else self.extra_head(k, f) for k, f in zip(heads, feats)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return out[..., :h, :w].contiguous()

    def extra_head(self, k: int, features: torch.Tensor) -> torch.Tensor:
        """Head ``k`` (>= 1) on its branch's features, at full resolution."""
        out = self.extra_heads[k - 1](features)
        return F.pixel_shuffle(out, self.branch_stride) if self.branch_stride > 1 else out

    def head_parameters(self, k: int):
        """The parameters head ``k``'s output depends on."""
        branch = self.unet.parameters() if k == 0 or self.branch == "head" else \
            [*(p for n, p in self.unet.named_parameters() if not n.startswith("up.")),
             *self.extra_decoders[k - 1].parameters()]
        return [*branch, *(self.extra_heads[k - 1] if k else self.head).parameters()]

    def copy_first_head(self) -> None:
        """Start every other head (and its decoder) as a copy of head 0: a second target
        learned on top of a trained first one (``init_from`` of a one-headed model).  A
        head short of full resolution (``branch_stride`` 2) has another shape and starts
        fresh; its decoder's levels are copies of the first decoder's."""
        for k, extra in enumerate(self.extra_heads):
            if self.branch_stride == 1:
                extra.load_state_dict(self.head.state_dict())
            if self.branch == "decoder":  # its levels, the coarsest first, as the first decoder's
                for mine, first in zip(self.extra_decoders[k], self.unet.up):
                    mine.load_state_dict(first.state_dict())


def _valid(centroids: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(centroids).all(-1)


def heat_target(centroids: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian heat map (B, H, W) peaking at 1 on each centroid's pixel, and the (b, p)
    index and integer pixel of every valid centroid."""
    valid = _valid(centroids)
    px_all = torch.nan_to_num(centroids, nan=0.0).round().long()
    px_all[..., 0].clamp_(0, w - 1)
    px_all[..., 1].clamp_(0, h - 1)
    yy = torch.arange(h, device=centroids.device).view(1, 1, h, 1)
    xx = torch.arange(w, device=centroids.device).view(1, 1, 1, w)
    g = torch.exp(-((xx - px_all[..., 0, None, None]) ** 2 + (yy - px_all[..., 1, None, None]) ** 2)
                  / (2 * HEAT_SIGMA_PX**2)) * valid[..., None, None]
    heat = g.amax(dim=1) if centroids.shape[1] else torch.zeros(centroids.shape[0], h, w, device=centroids.device)
    b_idx, p_idx = torch.nonzero(valid, as_tuple=True)
    return heat.float(), torch.stack([b_idx, p_idx], 1), px_all[b_idx, p_idx]


OFFSET_RADIUS_PX = 2  # offsets are trained on the 5 x 5 pixels around each centroid
# The cap on peaks per image bounds the table of faint candidates (from min_score 0.01,
# a 256 x 256 px field has thousands); it is meant to fall on noise, not on particles.
# A fixed 256 fell on particles in large images: it kept 256 of the 514 localisations
# above threshold per frame of a 1024 x 1024 px field (four 512 px benchmark frames side
# by side).  So the cap grows with the area, one peak per 16 x 16 px: about 6 times the
# benchmark field's density (one particle per 1,600 px^2).  It keeps the most probable,
# so the candidates that can pass a threshold are the last it drops.
MAX_PEAKS = 256
PIXELS_PER_PEAK = 16 * 16


def loss(model: nn.Module, images: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Points (B, P, 2) for one head; (B, P, 2, 2) for two: [..., k, :] is head k's target
    (centroid, exposure), each NaN where that target is absent.  An image whose points
    of head k are all infinite does not train head k (its target is not observable there)."""
    if points.dim() == 3:
        return _head_loss(model(images), points)
    trained = [~torch.isinf(points[:, :, k]).flatten(1).all(1) for k in range(points.shape[2])]
    heads = [k for k, t in enumerate(trained) if t.any()]
    if not heads:  # nothing to learn here: a zero that still reaches every parameter
        return model(images).sum() * 0.0, {}
    # A minibatch training one head runs that head's branch alone.
    out = model(images, heads[0]) if len(heads) == 1 else model(images)
    total, parts = 0.0, {}
    for k in heads:
        c = 0 if len(heads) == 1 else 4 * k
        value, p = _head_loss(out[trained[k], c:c + 4], points[trained[k], :, k])
        total = total + value
        parts.update({f"{name}{k}": v for name, v in p.items()})
    return total, parts


def _head_loss(out: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    h, w = out.shape[-2:]
    heat, idx, px = heat_target(centroids, h, w)
    logit = out[:, 0]
    p = torch.sigmoid(logit)
    pos = torch.zeros_like(heat, dtype=torch.bool)
    pos[idx[:, 0], px[:, 1], px[:, 0]] = True
    # CenterNet focal loss, in log-sigmoid form for stability.
    log_p, log_1p = F.logsigmoid(logit), F.logsigmoid(-logit)
    pos_loss = -((1 - p) ** 2 * log_p)[pos].sum()
    neg_loss = -((1 - heat) ** 4 * p**2 * log_1p)[~pos].sum()
    n = max(int(pos.sum()), 1)
    focal = (pos_loss + neg_loss) / n
    if len(idx):
        # Every pixel near a centroid learns to point at it, so the offset read at a
        # heat peak one pixel off is still right.  Nearer pixels weigh more.
        r = OFFSET_RADIUS_PX
        d = torch.arange(-r, r + 1, device=out.device)
        dy, dx = torch.meshgrid(d, d, indexing="ij")
        qx = (px[:, 0, None] + dx.reshape(1, -1))
        qy = (px[:, 1, None] + dy.reshape(1, -1))
        inside = (qx >= 0) & (qx < w) & (qy >= 0) & (qy < h)
        weight = torch.exp(-(dx**2 + dy**2).reshape(1, -1).float() / (2 * HEAT_SIGMA_PX**2)) * inside
        b = idx[:, 0, None].expand_as(qx)
        qxc, qyc = qx.clamp(0, w - 1), qy.clamp(0, h - 1)
        xy = centroids[idx[:, 0], idx[:, 1]]
        target = torch.stack([xy[:, 0, None] - qxc, xy[:, 1, None] - qyc], -1)  # (M, K, 2)
        pred = torch.stack([out[b, 1, qyc, qxc], out[b, 2, qyc, qxc]], -1)
        log_s = out[b, 3, qyc, qxc].clamp(-6, 3)
        d2 = ((pred - target) ** 2).sum(-1)
        norm = weight.sum()
        l1 = ((pred - target).abs().sum(-1) * weight).sum() / norm
        nll = ((0.5 * d2 * torch.exp(-2 * log_s) + 2 * log_s) * weight).sum() / norm
    else:
        l1 = nll = out.sum() * 0.0
    total = focal + l1 + 0.1 * nll
    return total, {"focal": focal.item(), "l1": l1.item(), "nll": nll.item()}


def build(params: Params) -> SpotNet:
    return SpotNet(params.widths, params.se, params.flip_tta, params.heads, params.branch, params.branch_stride)


@torch.no_grad()
def forward_flips(model: nn.Module, images: torch.Tensor, head: int | None = None) -> torch.Tensor:
    """Mean output over the four flips of the input (test-time augmentation).

    Flips are symmetries of the problem (Brownian motion is isotropic and reversible),
    so each flipped prediction is mapped back (a mirrored x flips the sign of dx) and
    the four are averaged."""
    n = images.shape[0]
    dims = [image_dims(ops) for ops in ALL_FLIPS]
    # One forward pass over the four flipped copies: larger batches run faster on a CPU.
    o = model(torch.cat([images.flip(d) if d else images for d in dims]), head)
    back = torch.stack([o[i * n:(i + 1) * n].flip(d) if d else o[i * n:(i + 1) * n] for i, d in enumerate(dims)])
    # Channels: heat logit, dx, dy, log sigma; a mirrored axis negates its offset.
    heads = o.shape[1] // 4
    sign = torch.tensor([[1, -1 if "hflip" in ops else 1, -1 if "vflip" in ops else 1, 1] * heads
                         for ops in ALL_FLIPS], dtype=o.dtype, device=o.device)
    return (back * sign[:, None, :, None, None]).mean(0)


def predict(model: SpotNet, images: torch.Tensor, min_score: float = 0.01, head: int = 0):
    out = forward_flips(model, images, head) if model.flip_tta else model(images, head)
    return decode(out, min_score)


@torch.no_grad()
def decode(out: torch.Tensor, min_score: float = 0.01, max_per_image: int | None = None):
    """Local maxima of the heat map -> per image (xy (n, 2), score (n,), sigma (n,)).

    At most ``max_per_image`` peaks per image, the most probable (default: 256, or one
    per ``PIXELS_PER_PEAK`` pixels in a larger image).

    The position is the probability-weighted mean of the centroid estimates
    (pixel + offset) of the 5 x 5 pixels around each peak.  The score is the
    probability that a spot is there and within 1 px of the estimate:
    p * (1 - exp(-1 / (2 sigma^2))), so well-localised detections rank first (chosen on
    the validation set over p alone, p / sigma and 3 x 3 averaging)."""
    p = torch.sigmoid(out[:, 0])
    # A peak is a pixel from min_score on that no pixel of its 3 x 3 exceeds (outside the
    # image: -inf, never the maximum).  The 3 x 3 maximum of the whole map, as shifted
    # maxima along x then y, costs less than gathering the neighbours of every candidate
    # (thousands from min_score 0.01 on a 256 x 256 px field), and less than max_pool2d
    # (2 ms for one such map here); the 5 x 5 weighted means are taken at the peaks alone.
    # nonzero is in row-major order.
    m = F.pad(p, (1, 1, 1, 1), value=-math.inf)
    m = torch.maximum(torch.maximum(m[..., :-2], m[..., 1:-1]), m[..., 2:])
    m = torch.maximum(torch.maximum(m[:, :-2], m[:, 1:-1]), m[:, 2:])
    peak = (p >= min_score) & (p == m)
    b, r, c = torch.nonzero(peak, as_tuple=True)
    d = torch.arange(-2, 3, device=out.device)
    # Outside the image: no weight in the mean (the average over the pixels inside, as
    # avg_pool2d without padding).
    padded = F.pad(p, (2, 2, 2, 2))
    bb, wr, wc = b[:, None, None], r[:, None, None] + 2 + d[None, :, None], c[:, None, None] + 2 + d[None, None, :]  # (K, 5, 5)
    wp = padded[bb, wr, wc]
    # Each window pixel's estimate relative to the peak's pixel (small numbers: no float32
    # rounding of a 256 px coordinate), then the peak's pixel added.
    ex = d[None, None, :] + F.pad(out[:, 1], (2, 2, 2, 2))[bb, wr, wc]
    ey = d[None, :, None] + F.pad(out[:, 2], (2, 2, 2, 2))[bb, wr, wc]
    norm = wp.sum((1, 2))
    mx, my = c + (wp * ex).sum((1, 2)) / norm, r + (wp * ey).sum((1, 2)) / norm
    s = p[b, r, c]
    sigma = torch.exp(out[b, 3, r, c].clamp(-6, 3))
    score = (s * (1 - torch.exp(-1 / (2 * sigma**2)))).double().cpu().numpy()
    xy = torch.stack([mx, my], 1).double().cpu().numpy()
    sigma, s, b = sigma.double().cpu().numpy(), s.cpu().numpy(), b.cpu().numpy()
    bounds = np.searchsorted(b, np.arange(out.shape[0] + 1))  # nonzero is in row-major order
    if max_per_image is None:
        max_per_image = max(MAX_PEAKS, out.shape[-2] * out.shape[-1] // PIXELS_PER_PEAK)
    results = []
    for i in range(out.shape[0]):
        sl = slice(bounds[i], bounds[i + 1])
        if bounds[i + 1] - bounds[i] > max_per_image:  # keep the most probable peaks
            keep = np.sort(np.argsort(-s[sl], kind="stable")[:max_per_image]) + bounds[i]
            results.append((xy[keep], score[keep], sigma[keep]))
        else:
            results.append((xy[sl], score[sl], sigma[sl]))
    return results
