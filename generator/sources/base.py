"""The contract every segmentation source meets, whatever it reads from.

A source is a Hugging Face ``datasets.Dataset`` with three columns:

- ``image_id`` (string, unique within the source),
- ``image`` (``datasets.Image``; decoded as a PIL image),
- ``mask`` (``datasets.Image``; a single-channel image whose pixel values are fine class ids,
  ``ignore_index`` where unlabelled),

plus the facts needed to read it: the class list with its fine → super hierarchy, the ignore
label, a licence and a revision string that changes whenever the content changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets

# The three columns of the contract, as every source declares them.
SOURCE_FEATURES = datasets.Features({
    "image_id": datasets.Value("string"),
    "image": datasets.Image(),
    "mask": datasets.Image(),
})


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    super_name: str
    is_background: bool = False


@dataclass
class SegmentationSource:
    name: str
    dataset: datasets.Dataset
    classes: list[ClassInfo]
    ignore_index: int = 255
    revision: str = ""
    license: str = "unknown"
    description: str = ""
    params: dict = field(default_factory=dict)
    # Whether few-shot probes make sense: a split into train and evaluation images of the same
    # kind. Inputs built to probe the model itself (content-free images) have none.
    probes: bool = True
    # Images (in dataset order) that train the probes; None: the default few-shot fraction.
    probe_train_count: int | None = None
    # Input files left out because they cannot be used (corrupt, too large or small, a mask that
    # does not fit): {"path": ..., "reason": ...} each, shown in the build summary and on the site.
    skipped: list[dict] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def super_names(self) -> list[str]:
        return sorted({c.super_name for c in self.classes})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.dataset)
