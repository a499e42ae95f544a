"""Where an image's pixels land in the square model input, under each resize policy.

Two policies (``--resize``):

- ``squash`` (the default): the whole image is resized to S × S, whatever its aspect ratio, so
  every pixel of the image (and of its mask) is seen, stretched.
- ``short-side-crop``: the evaluation transform of DINO / DINOv2 linear and k-NN evaluation and
  of timm (``transforms_imagenet_eval`` with ``crop_pct=1``): the short side is resized to S
  keeping the aspect ratio, then the central S × S window is kept. Sizes and offsets follow
  torchvision exactly (``Resize(S)`` computes the long side as ``int(S * long / short)``;
  ``CenterCrop`` puts the window at ``int(round((n - S) / 2))``).

An ``InputGeometry`` says, per axis, how long the image is, how long it becomes after the resize
and where the kept window starts; patch labels (``generator.sources.labels``) read the mask at
its own resolution through the same geometry, so labels and pixels stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

from generator.errors import PatchAtlasError

RESIZE_POLICIES = ("squash", "short-side-crop")
DEFAULT_RESIZE = "squash"


def check_resize(policy: str) -> str:
    if policy not in RESIZE_POLICIES:
        raise PatchAtlasError(f"--resize {policy!r}: expected one of {', '.join(RESIZE_POLICIES)} (squash: the whole "
                              f"image stretched to the input square; short-side-crop: short side resized to the "
                              f"input size, centre square kept)")
    return policy


@dataclass(frozen=True)
class Axis:
    """One axis of the mapping: ``source`` pixels are resized to ``resized``, and the input's
    ``length`` pixels are ``resized[offset:offset + length]``."""

    source: int
    resized: int
    offset: int
    length: int


@dataclass(frozen=True)
class InputGeometry:
    rows: Axis
    cols: Axis

    @property
    def resized_hw(self) -> tuple[int, int]:
        return self.rows.resized, self.cols.resized

    @property
    def crop_tl(self) -> tuple[int, int]:
        return self.rows.offset, self.cols.offset


def short_side_size(size_hw: tuple[int, int], side: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``side``, as torchvision's ``Resize(side)``."""
    h, w = size_hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(side * long / short)  # torchvision truncates the float ratio the same way
    return (new_long, side) if w <= h else (side, new_long)


def centre_crop_offset(length: int, crop: int) -> int:
    """Start of a centred window of ``crop`` in ``length``, rounded as torchvision's ``CenterCrop``."""
    return int(round((length - crop) / 2.0))


def input_geometry(size_hw: tuple[int, int], side: int, policy: str = DEFAULT_RESIZE) -> InputGeometry:
    """How an image of ``size_hw`` = (height, width) becomes the ``side`` × ``side`` input."""
    check_resize(policy)
    h, w = (int(v) for v in size_hw)
    if h < 1 or w < 1 or side < 1:
        raise PatchAtlasError(f"image of size {size_hw} to an input of {side} px: sizes must be positive")
    if policy == "squash":
        return InputGeometry(Axis(h, side, 0, side), Axis(w, side, 0, side))
    rh, rw = short_side_size((h, w), side)
    return InputGeometry(Axis(h, rh, centre_crop_offset(rh, side), side),
                         Axis(w, rw, centre_crop_offset(rw, side), side))


def squash_geometry(size_hw: tuple[int, int], grid_hw: tuple[int, int]) -> InputGeometry:
    """The whole of an image of ``size_hw`` mapped onto a grid of ``grid_hw`` cells (one unit per
    cell): the geometry of a mask reduced straight to its patch grid."""
    (h, w), (gh, gw) = size_hw, grid_hw
    return InputGeometry(Axis(int(h), int(gh), 0, int(gh)), Axis(int(w), int(gw), 0, int(gw)))
