"""The model zoo as data: one row per model, one function turns a row into an encoder.

Adding a model means adding a row. Facts that timm also knows (mean/std, interpolation, licence)
are written here too so the atlas can list the zoo without touching timm, and a test checks the
two agree.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from generator.errors import PatchAtlasError, UnknownName

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

FAMILIES = ("CL", "MIM", "CL+MIM", "supervised", "language", "random", "control")


@dataclass(frozen=True)
class PosEmbedResample:
    """How a learned absolute position embedding is resized to another patch grid (bicubic).

    ``offset`` 0 interpolates to the target grid size. A non-zero offset is the DINO / DINOv2
    rule (``interpolate_pos_encoding`` in facebookresearch/dino and dinov2
    ``dinov2/models/vision_transformer.py``): the scale factor is (grid + offset) / native grid and
    the kernel samples at that scale, not at the ratio of the two sizes.
    """

    antialias: bool = True
    offset: float = 0.0


# timm's own rule (``resample_abs_pos_embed``), which the original code of most rows also follows.
TIMM_POS_EMBED = PosEmbedResample(antialias=True, offset=0.0)
# DINO and the DINOv2 models without registers (dinov2/hub/backbones.py defaults):
# no antialiasing, offset 0.1. The register models set antialias=True, offset 0.
DINO_POS_EMBED = PosEmbedResample(antialias=False, offset=0.1)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the zoo.

    ``timm_id`` is ``architecture.tag``: timm resolves the tag to the Hub repository holding the
    weights. ``input_size`` is the side the atlas feeds the model (a fixed 224 policy by
    default so grids are comparable across models); ``native_size`` is what it was trained at.
    """

    name: str
    timm_id: str
    family: str
    patch_size: int
    input_size: int
    native_size: int
    num_prefix_tokens: int  # CLS + registers
    num_registers: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    license: str = "apache-2.0"
    gated: bool = False
    pretrained: bool = True  # False for the labelled `random` baseline and the constructed controls
    input_policy: str = "fixed"  # "fixed" (a size the model was built for) | "dynamic" (dynamic_img_size)
    model_kwargs: dict = field(default_factory=dict)
    description: str = ""
    # Set for models timm has no weights for: their original checkpoint format, loaded through
    # an explicit key mapping (generator.models.checkpoints). ``hub_file`` is where the Hub holds
    # such a checkpoint, when it does ("repo_id/filename").
    checkpoint_format: str = ""
    hub_file: str = ""
    # How the position embedding is resized when the input grid is not the native one; None for
    # models without a learned absolute position embedding (DINOv3: rotary embeddings only).
    pos_embed_resample: PosEmbedResample | None = TIMM_POS_EMBED
    # The timm architecture that holds learned q/v biases, for rows whose default architecture
    # has none (DINOv3: timm's ``*_qkvb`` twins); a checkpoint that carries such biases loads
    # into it, so they are never dropped.
    qkv_bias_architecture: str = ""
    # A non-affine BatchNorm (exact train statistics) before the linear probe: the
    # local-representations paper uses it for MAE only ("We do not use BatchNorm for SimMIM").
    probe_batchnorm: bool = False
    # Set for the calibration controls (family ``control``): the name of the construction in
    # generator.models.controls that writes every weight by hand. Such a model needs no weights
    # at all, so it is never "unavailable".
    construction: str = ""

    @property
    def published_id(self) -> str:
        """The model id that published files give: the timm id, the name of a constructed
        control, or "random" for the untrained baseline."""
        if self.construction:
            return self.name
        return self.timm_id if self.pretrained else "random"

    @property
    def needs_weights(self) -> bool:
        """Whether weights must be found (Hub, cache or checkpoint) before the model can run."""
        return self.pretrained and not self.construction

    @property
    def architecture(self) -> str:
        return self.timm_id.split(".", 1)[0]

    def create_kwargs(self) -> dict:
        """Keyword arguments for ``timm.create_model`` beyond the name."""
        kwargs = dict(self.model_kwargs)
        if self.input_policy == "dynamic":
            kwargs.setdefault("dynamic_img_size", True)
        else:
            kwargs.setdefault("img_size", self.input_size)
        return kwargs

    def grid_size(self) -> tuple[int, int]:
        side = self.input_size // self.patch_size
        return side, side


def with_input_size(entry: ModelEntry, side: int) -> ModelEntry:
    """``entry`` fed ``side`` × ``side`` inputs. Fixed-size models are then built at that size
    (``img_size``), and timm resamples their position embedding when the weights load, unless
    the row resizes it by a rule of its own (DINO's): then the grid becomes dynamic, so that rule
    applies at every pass."""
    if isinstance(side, bool) or not isinstance(side, int) or side < entry.patch_size or side % entry.patch_size:
        near = entry.patch_size * max(1, round(side / entry.patch_size)) if isinstance(side, (int, float)) else 224
        raise PatchAtlasError(f"input size {side!r} for {entry.name}: must be a positive multiple of its patch size "
                              f"{entry.patch_size}, such as {near}")
    if side == entry.input_size:
        return entry
    if (entry.input_policy == "fixed" and side != entry.native_size
            and entry.pos_embed_resample not in (None, TIMM_POS_EMBED)):
        # timm would resample at load with its own rule; built at its native size with a dynamic
        # grid, the model resizes its embedding at every forward pass by the row's own rule.
        return dataclasses.replace(entry, input_size=side, input_policy="dynamic")
    return dataclasses.replace(entry, input_size=side)


def _dino(name, arch, patch, desc):
    return ModelEntry(name=name, timm_id=f"{arch}.dino", family="CL",
                      patch_size=patch, input_size=224, native_size=224, num_prefix_tokens=1, description=desc,
                      pos_embed_resample=DINO_POS_EMBED)


def _dinov2(name, arch, registers, desc):
    return ModelEntry(
        name=name, timm_id=f"{arch}.lvd142m", family="CL",
        patch_size=14, input_size=224, native_size=518, num_prefix_tokens=1 + registers, num_registers=registers,
        input_policy="dynamic", description=desc,
        pos_embed_resample=TIMM_POS_EMBED if registers else DINO_POS_EMBED,
    )


def _control(construction, desc):
    # A two-block ViT-Ti/16 at 224 px: what the constructions (generator.models.controls) need
    # (width 192, one CLS token, a 14×14 grid), and cheap enough to run beside every real model.
    return ModelEntry(
        name=f"control-{construction}", timm_id="vit_tiny_patch16_224", family="control",
        patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1, pretrained=False,
        license="apache-2.0", model_kwargs={"depth": 2}, construction=construction,
        description=f"Calibration control, weights constructed by hand: {desc}",
    )


SAT493M_MEAN = (0.430, 0.411, 0.296)  # DINOv3's satellite pretraining statistics
SAT493M_STD = (0.213, 0.156, 0.143)


def _dinov3(name, arch, desc, tag="lvd1689m"):
    stats = {"mean": SAT493M_MEAN, "std": SAT493M_STD} if tag == "sat493m" else {}
    return ModelEntry(
        name=name, timm_id=f"{arch}.{tag}", family="CL",
        patch_size=16, input_size=224, native_size=256, num_prefix_tokens=5,
        num_registers=4, license="dinov3-license",
        gated=True, input_policy="dynamic", description=desc, pos_embed_resample=None,
        qkv_bias_architecture=f"{arch}_qkvb", **stats,
    )


MODELS: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        _dino("dino_vits16", "vit_small_patch16_224", 16, "DINO ViT-S/16"),
        _dino("dino_vits8", "vit_small_patch8_224", 8, "DINO ViT-S/8"),
        _dino("dino_vitb16", "vit_base_patch16_224", 16, "DINO ViT-B/16"),
        _dino("dino_vitb8", "vit_base_patch8_224", 8, "DINO ViT-B/8"),
        _dinov2("dinov2_vits14", "vit_small_patch14_dinov2", 0, "DINOv2 ViT-S/14"),
        _dinov2("dinov2_vitb14", "vit_base_patch14_dinov2", 0, "DINOv2 ViT-B/14"),
        _dinov2("dinov2_vitl14", "vit_large_patch14_dinov2", 0, "DINOv2 ViT-L/14"),
        _dinov2("dinov2_vitg14", "vit_giant_patch14_dinov2", 0, "DINOv2 ViT-g/14"),
        _dinov2("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 4, "DINOv2 ViT-S/14 with 4 registers"),
        _dinov2("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", 4, "DINOv2 ViT-B/14 with 4 registers"),
        _dinov2("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2", 4, "DINOv2 ViT-L/14 with 4 registers"),
        _dinov2("dinov2_vitg14_reg", "vit_giant_patch14_reg4_dinov2", 4, "DINOv2 ViT-g/14 with 4 registers"),
        _dinov3("dinov3_vits16", "vit_small_patch16_dinov3", "DINOv3 ViT-S/16"),
        _dinov3("dinov3_vits16plus", "vit_small_plus_patch16_dinov3", "DINOv3 ViT-S+/16"),
        _dinov3("dinov3_vitb16", "vit_base_patch16_dinov3", "DINOv3 ViT-B/16"),
        _dinov3("dinov3_vitl16", "vit_large_patch16_dinov3", "DINOv3 ViT-L/16"),
        _dinov3("dinov3_vith16plus", "vit_huge_plus_patch16_dinov3", "DINOv3 ViT-H+/16"),
        _dinov3("dinov3_vitl16_sat", "vit_large_patch16_dinov3", "DINOv3 ViT-L/16 (satellite)", tag="sat493m"),
        ModelEntry(name="mae_vitb16", timm_id="vit_base_patch16_224.mae", family="MIM",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1,
                   license="cc-by-nc-4.0", description="MAE ViT-B/16 (encoder, no masking)", probe_batchnorm=True),
        ModelEntry(name="mae_vitl16", timm_id="vit_large_patch16_224.mae", family="MIM",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1,
                   license="cc-by-nc-4.0", description="MAE ViT-L/16 (encoder, no masking)", probe_batchnorm=True),
        ModelEntry(name="mae_vith14", timm_id="vit_huge_patch14_224.mae", family="MIM",
                   patch_size=14, input_size=224, native_size=224, num_prefix_tokens=1,
                   license="cc-by-nc-4.0", description="MAE ViT-H/14 (encoder, no masking)", probe_batchnorm=True),
        *[ModelEntry(name=f"eva02_vit{size[0]}14_mim", timm_id=f"eva02_{size}_patch14_224.mim_in22k", family="MIM",
                     patch_size=14, input_size=224, native_size=224, num_prefix_tokens=1,
                     mean=CLIP_MEAN, std=CLIP_STD, license="mit",
                     description=f"EVA-02 ViT-{size[0].upper()}/14 MIM (IN-22k)")
          for size in ("tiny", "small", "base", "large")],
        ModelEntry(name="supervised_vitb16", timm_id="vit_base_patch16_224.augreg_in21k_ft_in1k", family="supervised",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1,
                   mean=HALF, std=HALF, description="Supervised ViT-B/16 (AugReg IN-21k → IN-1k)"),
        ModelEntry(name="clip_vitb16", timm_id="vit_base_patch16_clip_224.openai", family="language",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1,
                   mean=CLIP_MEAN, std=CLIP_STD, description="CLIP ViT-B/16 (OpenAI) image tower"),
        ModelEntry(name="siglip_vitb16", timm_id="vit_base_patch16_siglip_224.webli", family="language",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=0,
                   mean=HALF, std=HALF, description="SigLIP ViT-B/16 image tower (no CLS token)"),
        ModelEntry(name="ibot_vits16", timm_id="vit_small_patch16_224", family="CL+MIM",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1, checkpoint_format="ibot",
                   pos_embed_resample=DINO_POS_EMBED,
                   description="iBOT ViT-S/16 (teacher), original checkpoint"),
        ModelEntry(name="ibot_vitb16", timm_id="vit_base_patch16_224", family="CL+MIM",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1, checkpoint_format="ibot",
                   pos_embed_resample=DINO_POS_EMBED,
                   description="iBOT ViT-B/16 (teacher), original checkpoint"),
        ModelEntry(name="ibot_vitl16", timm_id="vit_large_patch16_224", family="CL+MIM",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1, checkpoint_format="ibot",
                   pos_embed_resample=DINO_POS_EMBED,
                   description="iBOT ViT-L/16 (teacher), original checkpoint"),
        ModelEntry(name="simmim_vitb16", timm_id="beit_base_patch16_224", family="MIM",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1, license="mit",
                   checkpoint_format="simmim", pos_embed_resample=None,
                   description="SimMIM ViT-B/16 (800 epochs), original checkpoint"),
        ModelEntry(name="beit_vitb16_pt22k", timm_id="beit_base_patch16_224", family="MIM",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1, mean=HALF, std=HALF,
                   license="apache-2.0", checkpoint_format="beit_hf", pos_embed_resample=None,
                   hub_file="microsoft/beit-base-patch16-224-pt22k/model.safetensors",
                   description="BEiT ViT-B/16 self-supervised on IN-22k (no fine-tuning)"),
        ModelEntry(name="torchvision_vitb16", timm_id="vit_base_patch16_224", family="supervised",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1,
                   interpolation="bilinear", license="bsd-3-clause", checkpoint_format="torchvision_vit",
                   description="torchvision vit_b_16 (IMAGENET1K_V1), as in the local-representations paper"),
        ModelEntry(name="random", timm_id="vit_small_patch16_224", family="random",
                   patch_size=16, input_size=224, native_size=224, num_prefix_tokens=1, pretrained=False,
                   description="Untrained ViT-S/16 (seeded timm initialisation): the baseline"),
        _control("position", "tokens carry position only (a sinusoidal code of row and column; no pixels), "
                             "so position decodes exactly and content not at all"),
        _control("content", "tokens are a fixed function of the patch pixels (mean colours of the patch and "
                            "its 2×2 and 4×4 cells), with no position"),
        _control("border", "the content control plus one large constant vector on the outermost ring of "
                           "patches: a planted border artifact"),
        _control("highnorm", "the content control plus 4 of 196 positions with tokens 20× the median norm: "
                             "planted high-norm tokens (2.04 %)"),
        _control("junkdims", "the content control plus 8 dimensions of position-keyed noise with huge "
                             "variance: planted junk dims that k-NN suffers from until they are removed"),
    ]
}

CONTROL_MODELS = tuple(name for name, e in MODELS.items() if e.family == "control")

# The models a default build asks for: one of each behaviour the atlas is about, plus the baseline
# and the calibration controls (the zero and the ceiling of every metric).
DEFAULT_MODELS = ("dino_vits16", "dinov2_vits14_reg", "mae_vitb16", "random", *CONTROL_MODELS)


def _meta_model(entry: ModelEntry):
    """The architecture built on the meta device: shapes only, no memory, no weights."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(entry.architecture, pretrained=False, num_classes=0, **entry.create_kwargs())


def _count_parameters(entry: ModelEntry) -> int:
    return sum(p.numel() for p in _meta_model(entry).parameters())


def _timm_hub_id(entry: ModelEntry) -> str | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(entry.timm_id) if entry.pretrained else None
    return cfg.hf_hub_id if cfg and cfg.hf_hub_id else None


# What timm would compute for a row (its parameter count, the Hub repository of its weights),
# written to facts.json so that listing the zoo imports neither torch nor timm (seconds each).
# A row whose timm id or arguments changed since is computed again; tests/test_cli_exit.py checks
# the file against timm, and `python -m generator.models.registry` rewrites it.
FACTS_FILE = Path(__file__).with_name("facts.json")


def _fingerprint(entry: ModelEntry) -> str:
    return json.dumps([entry.timm_id, entry.create_kwargs()], sort_keys=True, default=repr)


@functools.lru_cache(maxsize=1)
def _written_facts() -> dict:
    return json.loads(FACTS_FILE.read_text()) if FACTS_FILE.is_file() else {}


def written_facts(entry: ModelEntry) -> dict | None:
    """The row's facts as facts.json holds them; None where the file has none for the row's
    current timm id and arguments (then they are computed, at timm's cost)."""
    facts = _written_facts().get(entry.name)
    return facts if facts and facts.get("fingerprint") == _fingerprint(entry) else None


def parameter_count(entry: ModelEntry) -> int:
    """Parameters of the architecture."""
    facts = written_facts(entry)
    return facts["params"] if facts else _count_parameters(entry)


def weights_hub_id(entry: ModelEntry) -> str | None:
    """The Hub repository timm loads the row's pretrained weights from (None: none on the Hub)."""
    facts = written_facts(entry)
    return facts["hf_hub_id"] if facts else _timm_hub_id(entry)


def computed_facts(entries=None) -> dict:
    """The facts of ``entries`` (default: the zoo) as timm computes them now."""
    return {e.name: {"fingerprint": _fingerprint(e), "params": _count_parameters(e), "hf_hub_id": _timm_hub_id(e)}
            for e in (entries if entries is not None else MODELS.values())}


@dataclass(frozen=True)
class Geometry:
    """The shapes of a model's tokens, known before (and without) its weights."""

    depth: int
    embed_dim: int
    num_prefix_tokens: int


def model_geometry(entry: ModelEntry) -> Geometry:
    model = _meta_model(entry)
    return Geometry(len(model.blocks), int(model.embed_dim), int(getattr(model, "num_prefix_tokens", 0)))


def get_model_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownName(
            f"unknown model {name!r}.{hint} Run `patchatlas models` to list the zoo."
        ) from None


if __name__ == "__main__":
    FACTS_FILE.write_text(json.dumps(computed_facts(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FACTS_FILE}")
