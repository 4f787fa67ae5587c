"""Keypoint R-CNN, the seed paper's detector (torchvision), sized for small images.

torchvision's default transform rescales images to 800 px; a 24 x 25 image (the paper's)
is instead rescaled to ``min_size`` (128 px by default, x 5.3), so a 6 px spot box becomes
about 32 px and the anchors (one square size per FPN level, 16 - 128 px) are chosen for
that.  Every image is zoomed by that same factor, ``min_size / 24`` (``FixedZoom``), not
to a short side of ``min_size`` as torchvision does: with torchvision's rule a spot's
apparent size depended on the image's size (a 40 x 64 field zoomed x 1.6 against x 2.7
for the 24 x 25 images a model learnt on), and a model missed spots in any other size.
One class (particle) and one keypoint (the trajectory centroid).  Weights: trained
from scratch by default; ``weights_path`` loads a user-supplied file (for example
torchvision's COCO keypoint weights fetched elsewhere), keeping every tensor whose
shape fits (the COCO heads with 91 classes / 17 keypoints are re-initialised).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import torch
from pydantic import Field
from torchvision.models.detection import KeypointRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes, resize_keypoints

from factory.config import StrictModel
from loaders.targets import keypoint_decode, keypoint_target

from models.detectors.weights import load_matching
from .blocks import normalize_images


LABEL = "Keypoint R-CNN (ours)"
TRAIN_DEFAULTS = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 8}
PIXELS_PER_BATCH = 2**16
REFERENCE_PX = 24  # the paper's image height: ``min_size`` is what it is zoomed to


class Params(StrictModel):
    """Keypoint R-CNN's parameters; see ``SmallKeypointRCNN`` for what each changes."""

    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet18"
    min_size: Annotated[int, Field(ge=16, le=4096)] = 128
    max_size: Annotated[int, Field(ge=16, le=8192)] = 1024
    box_half_px: Annotated[float, Field(gt=0, le=64)] = 3.0
    keypoint_head: Optional[list[Annotated[int, Field(ge=1, le=1024)]]] = [64, 64, 64, 64]
    box_head: Optional[Annotated[int, Field(ge=1, le=4096)]] = 256
    proposals: Optional[Annotated[int, Field(ge=2, le=4096)]] = 32
    weights_path: Optional[str] = None  # a user-supplied weights file (e.g. COCO keypoints)


class FixedZoom(GeneralizedRCNNTransform):
    """torchvision's transform, zooming every image by ``min_size / REFERENCE_PX`` (capped so
    the long side stays within ``max_size``) whatever its size: a spot keeps the apparent
    size the model learnt.  An image whose short side is 24 px (the paper's 24 x 25) is
    zoomed exactly as torchvision zooms it (same factor, same draw of torch's generator in
    training), so trained models and seeded runs are unchanged on such images."""

    def resize(self, image, target=None):
        h, w = image.shape[-2:]
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        scale = min(size / REFERENCE_PX, self.max_size / max(h, w))
        image = torch.nn.functional.interpolate(image[None], scale_factor=scale, mode="bilinear",
                                                recompute_scale_factor=True, align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
            if "keypoints" in target:
                target["keypoints"] = resize_keypoints(target["keypoints"], (h, w), image.shape[-2:])
        return image, target


class SmallKeypointRCNN(torch.nn.Module):
    def __init__(self, backbone: str = "resnet18", min_size: int = 128, max_size: int = 1024,
                 box_half_px: float = 3.0, keypoint_head: list[int] | None = (64, 64, 64, 64),
                 box_head: int | None = 256, proposals: int | None = 32, weights_path: str | None = None):
        """``keypoint_head``: channels of the keypoint head's convolutions; None keeps
        torchvision's (8 x 512, about 3.7 GFLOP per region: fine on a GPU, hours on a
        CPU).  ``box_head``: width of the box head's two layers (None: torchvision's
        1024).  ``proposals``: regions sampled per image (None: torchvision's 2000/512);
        32 is plenty for images holding a few spots."""
        super().__init__()
        self.box_half_px = box_half_px
        fpn = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5)
        anchors = AnchorGenerator(sizes=((16,), (32,), (48,), (64,), (128,)), aspect_ratios=((1.0,),) * 5)
        extra = {}
        if keypoint_head is not None:
            extra["keypoint_head"] = KeypointRCNNHeads(fpn.out_channels, list(keypoint_head))
            extra["keypoint_predictor"] = KeypointRCNNPredictor(list(keypoint_head)[-1], 1)
        if box_head is not None:
            extra["box_head"] = TwoMLPHead(fpn.out_channels * 7 * 7, box_head)
            extra["box_predictor"] = FastRCNNPredictor(box_head, 2)
        if proposals is not None:
            extra.update(rpn_pre_nms_top_n_train=4 * proposals, rpn_post_nms_top_n_train=proposals,
                         rpn_pre_nms_top_n_test=2 * proposals, rpn_post_nms_top_n_test=proposals // 2,
                         rpn_batch_size_per_image=proposals, box_batch_size_per_image=proposals)
        self.net = KeypointRCNN(
            fpn, num_classes=None if box_head is not None else 2, num_keypoints=None if keypoint_head is not None else 1,
            min_size=min_size, max_size=max_size,
            # Images arrive standardised per image: no ImageNet statistics.
            image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
            rpn_anchor_generator=anchors, box_score_thresh=0.0, box_detections_per_img=100, **extra,
        )
        t = self.net.transform  # no parameters nor buffers: state dicts are unchanged
        self.net.transform = FixedZoom(t.min_size, t.max_size, t.image_mean, t.image_std,
                                       size_divisible=t.size_divisible, fixed_size=t.fixed_size)
        if weights_path:
            load_matching(self.net, weights_path)

    def inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = normalize_images(images)
        return [im.expand(3, -1, -1) for im in x]

    def forward(self, images: torch.Tensor, targets=None):
        return self.net(self.inputs(images), targets)


def build(params: Params) -> SmallKeypointRCNN:
    return SmallKeypointRCNN(**params.model_dump())


def loss(model: SmallKeypointRCNN, images: torch.Tensor, centroids: torch.Tensor):
    model.train()
    targets = []
    for c in centroids:
        c = c[torch.isfinite(c).all(-1)]
        t = keypoint_target(c.cpu().numpy(), model.box_half_px)
        targets.append({k: v.to(images.device) for k, v in t.items()})
    losses = model(images, targets)
    return sum(losses.values()), {k: v.item() for k, v in losses.items()}


@torch.no_grad()
def predict(model: SmallKeypointRCNN, images: torch.Tensor, min_score: float = 0.01):
    model.eval()
    res = []
    for out in model(images):
        keep = out["scores"] >= min_score
        xy, s = keypoint_decode({"keypoints": out["keypoints"][keep], "scores": out["scores"][keep]})
        res.append((xy, s, None))
    return res

