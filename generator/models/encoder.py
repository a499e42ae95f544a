"""One contract for every model: pixels in, per-layer patch and prefix tokens out.

``load_encoder`` is the single way a registry row becomes a ready model. Weights come only
through real loading paths — timm's pretrained resolution (Hugging Face Hub or its local cache)
or a checkpoint file the user names. When none works the model is reported as unavailable;
nothing is ever silently replaced by random weights (the untrained model exists only as the
labelled ``random`` row).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from generator.errors import PatchAtlasError, WeightsUnavailable
from generator.hashing import file_sha256
from generator.models.attention import attention_output, capture_last_block_attention, last_block_attention
from generator.models.checkpoints import (
    capture_checkpoint_filter,
    check_nothing_dropped,
    create_model_from_checkpoint,
    read_state_dict_file,
)
from generator.models.registry import TIMM_POS_EMBED, ModelEntry, PosEmbedResample
from generator.sources.geometry import DEFAULT_RESIZE, check_resize, input_geometry

NORMS = ("prenorm", "postnorm")
# The last block's attention inputs, kept as extra views of the patches (heads concatenated).
QKV_VIEWS = ("queries", "keys", "values")
RANDOM_INIT_SEED = 0
# Float pixels of one resize call in preprocessing: a batch of large photos (256 images of 12 MP
# are 37 GB as floats) is resized in slices of about this many bytes.
RESIZE_SLICE_BYTES = 1 << 29


@dataclass
class LayerTokens:
    patch: torch.Tensor  # [B, gh, gw, D]
    prefix: torch.Tensor  # [B, P, D]: CLS then registers


@dataclass
class TokenBatch:
    grid: tuple[int, int]
    layers: dict[tuple[int, str], LayerTokens]  # (1-based layer, norm) -> tokens


@dataclass
class WeightsInfo:
    """Where the weights came from, recorded with every result."""

    source: str  # "hub" | "checkpoint" | "random-init" | "constructed"
    location: str  # Hub repo id, checkpoint path, the init seed, or the control's name
    revision: str  # file hash or Hub revision; "" when unknown
    architecture: str = ""  # the timm architecture the weights went into ("" : the row's own)


def resolve_layers(spec: str | Sequence[int], depth: int) -> list[int]:
    """Turn a layer spec into sorted 1-based block indices.

    ``"all"``, ``"last"``, ``"quartiles"`` (depth/4, depth/2, 3·depth/4, depth), or explicit
    integers; negative integers count from the end (-1 = last block).
    """
    if isinstance(spec, str):
        word = spec.strip().lower()
        if word == "all":
            return list(range(1, depth + 1))
        if word == "last":
            return [depth]
        if word == "quartiles":
            return sorted({max(1, round(depth * q / 4)) for q in (1, 2, 3, 4)})
        try:
            values = [int(v) for v in word.split(",") if v.strip()]
        except ValueError:
            raise PatchAtlasError(
                f"layers {spec!r}: expected 'all', 'last', 'quartiles' or comma-separated block "
                f"numbers such as '4,8,12'"
            ) from None
    else:
        values = [int(v) for v in spec]
    resolved = set()
    for v in values:
        layer = depth + 1 + v if v < 0 else v
        if not 1 <= layer <= depth:
            raise PatchAtlasError(f"layer {v} is outside this model's blocks 1..{depth}")
        resolved.add(layer)
    if not resolved:
        raise PatchAtlasError(f"layers {spec!r} selects no layer")
    return sorted(resolved)


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int,
                       rule: PosEmbedResample) -> torch.Tensor:
    """A [1, prefix + M·M, D] position embedding resized to ``grid`` (rows, columns) by ``rule``.

    The DINO / DINOv2 rule (facebookresearch/dinov2 ``interpolate_pos_encoding``): left as is
    on the native square grid; otherwise the patch part is interpolated bicubically in float32,
    with a scale factor of (grid + offset) / M when an offset is set, and the prefix part is
    kept.
    """
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(patch.shape[1])
    if side * side != patch.shape[1]:
        raise PatchAtlasError(f"position embedding of {patch.shape[1]} patches is not a square grid")
    rows, cols = grid
    if (rows, cols) == (side, side):
        return pos_embed
    square = patch.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if rule.offset:
        how = {"scale_factor": ((rows + rule.offset) / side, (cols + rule.offset) / side)}
    else:
        how = {"size": (rows, cols)}
    resized = F.interpolate(square, mode="bicubic", antialias=rule.antialias, **how)
    if tuple(resized.shape[-2:]) != (rows, cols):
        raise PatchAtlasError(f"position embedding resized to {tuple(resized.shape[-2:])}, not the grid "
                              f"{rows}x{cols}: offset {rule.offset} is too large")
    resized = resized.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


def use_pos_embed_rule(entry: ModelEntry, model: torch.nn.Module) -> None:
    """Make the model resize its position embedding as the row declares, in place.

    timm resizes with its own rule (antialiased bicubic to the exact size); where the original
    code does otherwise, the position-embedding step of timm's ``VisionTransformer`` is replaced
    by one that calls :func:`resample_pos_embed`. Everything else about the step (prefix
    tokens, whether they carry a position) is timm's.
    """
    rule = entry.pos_embed_resample
    if getattr(model, "pos_embed", None) is None or rule is None or rule == TIMM_POS_EMBED:
        return
    from timm.models.vision_transformer import VisionTransformer

    if not getattr(model, "dynamic_img_size", False):
        if entry.input_size != entry.native_size:
            raise PatchAtlasError(
                f"{entry.name}: its position embedding is resized by {rule}, which only the dynamic input "
                f"policy applies; set input_policy='dynamic' or input_size={entry.native_size}")
        return  # the native grid: nothing is resized
    if not isinstance(model, VisionTransformer):
        raise PatchAtlasError(f"{entry.name}: resizing the position embedding by {rule} is implemented for "
                              f"timm VisionTransformer models only, not {type(model).__name__}")

    def pos_embed_step(x: torch.Tensor) -> torch.Tensor:
        batch, rows, cols, dim = x.shape
        prefix_in_pos = 0 if model.no_embed_class else model.num_prefix_tokens
        pos = resample_pos_embed(model.pos_embed, (rows, cols), prefix_in_pos, rule)
        x = x.view(batch, -1, dim)
        prefix = [t.expand(batch, -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
        if model.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return model.pos_drop(x)

    model._pos_embed = pos_embed_step


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The LayerNorm that ``forward_features`` ends with.

    Models pooled by averaging (EVA-02 MIM) keep it as ``fc_norm`` and leave ``norm`` as Identity.
    """
    norm = getattr(model, "norm", None)
    if norm is not None and not isinstance(norm, torch.nn.Identity):
        return norm
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is not None and not isinstance(fc_norm, torch.nn.Identity):
        return fc_norm
    return torch.nn.Identity()


class Encoder:
    """A timm ViT wrapped to the atlas's token contract."""

    def __init__(self, entry: ModelEntry, model: torch.nn.Module, weights: WeightsInfo,
                 device: str | torch.device = "cpu", resize: str = DEFAULT_RESIZE):
        self.entry = entry
        self.resize = check_resize(resize)  # how an image becomes the square input (sources/geometry.py)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.weights = weights
        self.depth = len(model.blocks)
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.compiled = False
        self._norm = _final_norm(model)
        self._mean = torch.tensor(entry.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(entry.std, device=self.device).view(1, 3, 1, 1)

    @property
    def grid(self) -> tuple[int, int]:
        return self.entry.grid_size()

    def preprocess(self, images_uint8: Sequence[np.ndarray | torch.Tensor] | np.ndarray) -> torch.Tensor:
        """Images → [B, 3, S, S] normalised floats. Each image is an [H, W, 3] uint8 array or a
        [3, H, W] uint8 tensor (on any device: one decoded there stays there); sizes may differ.

        Each image becomes the model's S × S input by the encoder's resize policy (``squash``:
        resized to S × S; ``short-side-crop``: short side resized to S, centre square kept, as
        timm's and DINO's eval transforms do), resized with the model's interpolation and
        antialiasing, then normalised with the model's mean and std. Images
        of one size are resized together, in one call (the result does not depend on the
        batch); on CUDA the arrays travel in one pinned buffer, with one asynchronous copy.
        """
        images = list(images_uint8)
        if not images:
            raise PatchAtlasError("preprocess: no images; pass at least one [H, W, 3] uint8 image")
        arrays: dict[int, np.ndarray] = {}
        groups: dict[tuple[int, int], list[int]] = {}  # (H, W) -> indices, in order of first use
        for i, image in enumerate(images):
            if isinstance(image, torch.Tensor):
                _check_pixels(i, image.shape, image.dtype == torch.uint8, channel_axis=0)
                size = (int(image.shape[1]), int(image.shape[2]))
            else:
                arrays[i] = np.asarray(image, dtype=np.uint8)
                _check_pixels(i, arrays[i].shape, True, channel_axis=2)
                size = arrays[i].shape[:2]
            groups.setdefault(size, []).append(i)
        host_blocks = [[arrays[i] for i in indices if i in arrays] for indices in groups.values()]
        uploaded = iter(self._upload([block for block in host_blocks if block]))
        order, resized = [], []
        for indices, host_block in zip(groups.values(), host_blocks):
            on_device = [i for i in indices if i not in arrays]
            parts = [next(uploaded)] if host_block else []
            if on_device:
                # In the arrays' layout (channels last), so that the model sees one layout
                # whichever way an image was decoded.
                parts.append(torch.stack([images[i].to(self.device) for i in on_device])
                             .contiguous(memory_format=torch.channels_last))
            order += [i for i in indices if i in arrays] + on_device
            resized.append(self._resize(torch.cat(parts) if len(parts) > 1 else parts[0]))
        pixels = torch.cat(resized) if len(resized) > 1 else resized[0]
        if order != sorted(order):
            pixels = pixels[torch.as_tensor(np.argsort(order), device=self.device)]
        return (pixels - self._mean) / self._std

    def _upload(self, blocks: list[list[np.ndarray]]) -> list[torch.Tensor]:
        """Each list of same-sized [H, W, 3] arrays as one [n, 3, H, W] uint8 tensor on the device.

        All of them are staged in one buffer and moved in one copy; on CUDA the buffer is pinned,
        so the copy runs asynchronously (the caching host allocator keeps the buffer until it is
        done).
        """
        if not blocks:
            return []
        shapes = [(len(block), *block[0].shape) for block in blocks]
        counts = [int(np.prod(shape)) for shape in shapes]
        pinned = self.device.type == "cuda"
        staging = torch.empty(sum(counts), dtype=torch.uint8, pin_memory=pinned)
        host, offset = staging.numpy(), 0
        for block, shape, count in zip(blocks, shapes, counts):
            np.stack(block, out=host[offset:offset + count].reshape(shape))
            offset += count
        moved = staging.to(self.device, non_blocking=pinned)
        # [n, H, W, 3] seen as [n, 3, H, W]: channels last, the layout the arrays came in.
        return [part.view(shape).permute(0, 3, 1, 2) for part, shape in zip(moved.split(counts), shapes)]

    def _resize(self, block: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] uint8 → [n, 3, S, S] floats in [0, 1], a bounded slice of images at a time.

        ``squash`` resizes in one float pass. ``short-side-crop`` resizes as PIL does, which is
        what timm's and torchvision's eval transforms run on: the width, then the height, each
        pass rounded to 8 bits (within one level of PIL; one float pass differs by up to 20
        levels on fine texture, where PIL clips the first pass's overshoot), then crops.
        """
        side = self.entry.input_size
        geometry = input_geometry(tuple(block.shape[-2:]), side, self.resize)
        (height, width), (top, left) = geometry.resized_hw, geometry.crop_tl
        mode = "bicubic" if self.entry.interpolation == "bicubic" else "bilinear"
        if tuple(block.shape[-2:]) == (height, width):
            return block[..., top:top + side, left:left + side].float().div_(255.0)

        def resized(images: torch.Tensor) -> torch.Tensor:
            if self.resize == "squash":
                return F.interpolate(images.float().div_(255.0), size=(height, width), mode=mode, antialias=True,
                                     align_corners=False).clamp_(0, 1)
            x = images.float()
            for size in ((x.shape[-2], width), (height, width)):
                if tuple(x.shape[-2:]) != size:
                    x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False).round_().clamp_(0, 255)
            return x[..., top:top + side, left:left + side].div_(255.0)

        # The float copy of a slice stays near RESIZE_SLICE_BYTES, however large the images.
        step = max(1, RESIZE_SLICE_BYTES // max(1, 4 * block[0].numel()))
        slices = [resized(block[start:start + step]) for start in range(0, len(block), step)]
        return torch.cat(slices) if len(slices) > 1 else slices[0]

    def _autocast(self):
        # bf16 on GPUs for throughput; fp32 on CPU so tests compare exactly with timm.
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def tokens(self, pixels: torch.Tensor, layers: Sequence[int],
               norms: Sequence[str] = NORMS) -> TokenBatch:
        """Patch and prefix tokens of the given 1-based layers, in float32."""
        return self._forward(pixels, layers, norms, attention=False)[0]

    @torch.inference_mode()
    def tokens_and_attention(self, pixels: torch.Tensor, layers: Sequence[int],
                             norms: Sequence[str] = NORMS) -> tuple[TokenBatch, AttentionBatch]:
        """``tokens`` and ``attention`` from one forward pass (the last block's attention is
        recorded on the way; the pass runs to the last block even when it is not asked for)."""
        return self._forward(pixels, layers, norms, attention=True)

    def _forward(self, pixels: torch.Tensor, layers: Sequence[int], norms: Sequence[str],
                 attention: bool) -> tuple[TokenBatch, AttentionBatch | None]:
        for norm in norms:
            if norm not in NORMS:
                raise PatchAtlasError(f"norm {norm!r}: expected one of {', '.join(NORMS)}")
        indices = [layer - 1 for layer in layers]
        if attention and self.depth - 1 not in indices:
            indices.append(self.depth - 1)  # the pass must reach the last block's attention
        capture = capture_last_block_attention(self.model) if attention else contextlib.nullcontext()
        with capture as recorded, self._autocast():
            outputs = self.model.forward_intermediates(
                pixels, indices=indices, norm=False, return_prefix_tokens=True,
                output_fmt="NLC", intermediates_only=True,
            )
        batch, _, height, width = pixels.shape
        grid = (height // self.entry.patch_size, width // self.entry.patch_size)
        result: dict[tuple[int, str], LayerTokens] = {}
        for layer, out in zip(layers, outputs):
            patch, prefix = out if isinstance(out, tuple) else (out, out[:, :0])
            if prefix is None:
                prefix = patch[:, :0]
            for norm in norms:
                p, q = patch, prefix
                if norm == "postnorm":
                    # LayerNorm acts per token, so normalising the two parts apart equals
                    # normalising the whole sequence as forward_features does.
                    with self._autocast():
                        p, q = self._norm(p), self._norm(q)
                result[(layer, norm)] = LayerTokens(
                    patch=p.float().reshape(batch, grid[0], grid[1], -1),
                    prefix=q.float(),
                )
        tokens = TokenBatch(grid=grid, layers=result)
        return tokens, (_attention_batch(attention_output(self.model, pixels, recorded)) if attention else None)

    def compile_blocks(self) -> None:
        """``torch.compile`` every block but the last, in place.

        The last block stays eager because its attention is recorded by swapping its attention
        module's forward for a pass (``capture_last_block_attention``), which a compiled graph
        would not see. The blocks share one code object and timm's modules are inlined with
        their parameters as inputs, so one graph per input shape serves every block.
        """
        for block in list(self.model.blocks)[:-1]:
            block.compile(dynamic=False)
        self.compiled = True

    @torch.inference_mode()
    def attention(self, pixels: torch.Tensor) -> AttentionBatch:
        """The last block's CLS attention maps and its q/k/v of the patch tokens, in float32."""
        with self._autocast():
            out = last_block_attention(self.model, pixels)
        return _attention_batch(out)


def _check_pixels(index: int, shape, is_uint8: bool, channel_axis: int) -> None:
    expected = "[H, W, 3] uint8 array" if channel_axis == 2 else "[3, H, W] uint8 tensor"
    if not is_uint8 or len(shape) != 3 or shape[channel_axis] != 3:
        raise PatchAtlasError(f"preprocess: image {index} has shape {tuple(shape)}; expected an {expected} "
                              "(RGB, 8 bits per channel)")


def _attention_batch(out) -> AttentionBatch:
    batch = out.q.shape[0]
    gh, gw = out.grid
    prefix = out.num_prefix_tokens

    def patches(x: torch.Tensor) -> torch.Tensor:  # [B, heads, N, hd] → [B, gh, gw, heads·hd]
        return x[:, :, prefix:].permute(0, 2, 1, 3).reshape(batch, gh, gw, -1).float()

    # Row 0 is the CLS query; its weights on the patch keys form one map per head.
    cls_maps = out.attn[:, :, 0, prefix:].float().reshape(batch, -1, gh, gw) if prefix >= 1 else None
    return AttentionBatch(cls_maps=cls_maps, views={"queries": patches(out.q), "keys": patches(out.k),
                                                     "values": patches(out.v)})


@dataclass
class AttentionBatch:
    cls_maps: torch.Tensor | None  # [B, heads, gh, gw] CLS → patch weights; None without a CLS token
    views: dict[str, torch.Tensor]  # "queries" | "keys" | "values" → [B, gh, gw, heads·head_dim]


def load_encoder(entry: ModelEntry, *, checkpoint: str | Path | None = None,
                 device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                 trust_pickle: bool = False) -> Encoder:
    """Build the encoder for a registry row.

    - a calibration control (``entry.construction``): the architecture with every weight written
      by its construction in :mod:`generator.models.controls`; the revision is the hash of the
      resulting state.
    - ``random``: timm's own initialisation under a fixed seed (the labelled baseline).
    - ``checkpoint`` given: timm loads that file through its pretrained path (with the model's
      checkpoint filter, strict key matching), and every entry of the file must reach the model
      (``check_nothing_dropped``). A file with q/v biases goes into the row's
      ``qkv_bias_architecture`` when it has one. ``trust_pickle`` lets a torch file that
      pickles Python objects be read (``--trust-checkpoint``).
    - otherwise: timm resolves the pretrained tag on the Hub, which under ``HF_HUB_OFFLINE=1``
      reads only the local cache.
    Raises :class:`WeightsUnavailable` when weights cannot be had; never falls back to random.

    Pretrained models keep their classifier head (unused here): asking timm for another class
    count makes it load non-strictly, and a checkpoint with missing keys would then leave those
    layers randomly initialised without a word.
    """
    kwargs = entry.create_kwargs()
    if entry.construction:
        from generator.models.controls import construct, state_sha256

        if checkpoint is not None:
            raise PatchAtlasError(f"{entry.name} is a calibration control with constructed weights; it takes no "
                                  f"checkpoint (drop --weights {entry.name}=...)")
        model = construct(entry.construction,
                          timm.create_model(entry.architecture, pretrained=False, num_classes=0, **kwargs))
        return _encoder(entry, model, WeightsInfo("constructed", entry.name, state_sha256(model)), device)
    if not entry.pretrained:
        if checkpoint is not None:
            raise PatchAtlasError(f"{entry.name} is the untrained baseline; it takes no checkpoint")
        torch.manual_seed(RANDOM_INIT_SEED)
        model = timm.create_model(entry.architecture, pretrained=False, num_classes=0, **kwargs)
        return _encoder(entry, model, WeightsInfo("random-init", f"seed={RANDOM_INIT_SEED}", ""), device)

    if entry.checkpoint_format:
        path = Path(checkpoint).expanduser() if checkpoint is not None else _hub_file(entry, cache_dir)
        if not path.is_file():
            raise WeightsUnavailable(entry.name, f"checkpoint file not found: {path}")
        model = create_model_from_checkpoint(path, entry.checkpoint_format, entry.architecture,
                                             trust_pickle=trust_pickle, model_name=entry.name, **kwargs)
        return _encoder(entry, model, WeightsInfo("checkpoint", str(path), file_sha256(path)), device)

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(entry.name, f"checkpoint file not found: {path}")
        model, timm_id = _timm_model_from_file(entry, path, trust_pickle, kwargs)
        architecture = timm_id.split(".", 1)[0]
        return _encoder(entry, model, WeightsInfo("checkpoint", str(path), file_sha256(path),
                                                  "" if architecture == entry.architecture else architecture),
                        device)

    try:
        model = timm.create_model(
            entry.timm_id, pretrained=True, cache_dir=str(cache_dir) if cache_dir else None, **kwargs,
        )
    except (OSError, ConnectionError, ValueError) as err:
        # huggingface_hub's LocalEntryNotFoundError/GatedRepoError and urllib errors are OSErrors.
        hint = "gated on the Hub: log in and accept the licence" if entry.gated else "not in the local Hugging Face cache"
        from generator.sources.hub import _offline_flag, probe_hub

        if not _offline_flag() and not (probe := probe_hub()).reachable:
            # Online mode failing for want of a network reads like a missing file otherwise.
            hint = (f"the Hugging Face Hub is unreachable ({probe.endpoint}: {probe.error}) and it is not in "
                    f"the local cache; HF_HUB_OFFLINE=1 skips the Hub")
        raise WeightsUnavailable(
            entry.name,
            f"{hint}; download {entry.timm_id} once with network, or pass --weights "
            f"{entry.name}=PATH to a local checkpoint. ({type(err).__name__})",
        ) from err
    hub_id = model.pretrained_cfg.get("hf_hub_id") or entry.timm_id
    return _encoder(entry, model, WeightsInfo("hub", hub_id, _hub_revision(hub_id, cache_dir)), device)


def _encoder(entry: ModelEntry, model: torch.nn.Module, weights: WeightsInfo,
             device: str | torch.device) -> Encoder:
    use_pos_embed_rule(entry, model)
    return Encoder(entry, model, weights, device)


# Where timm's original-format filters look for q/v biases: DINOv3's fused qkv.bias, timm's
# q_bias / v_bias, split projections.
_QV_BIAS_KEY = r"blocks\.\d+\.attn\.(qkv\.bias|q_bias|v_bias|q_proj\.bias|v_proj\.bias)"


def _timm_model_from_file(entry: ModelEntry, path: Path, trust_pickle: bool,
                          kwargs: dict) -> tuple[torch.nn.Module, str]:
    """The row's timm model with the file's weights, through timm's checkpoint filter.

    The file is read here (timm's own reader has no trust gate), nested state dicts and DDP /
    compile prefixes are unwrapped as timm's ``load_state_dict`` does, and the result is handed
    to timm as the pretrained state dict.
    """
    import re

    from timm.models import clean_state_dict

    raw = clean_state_dict(read_state_dict_file(
        path, ("state_dict_ema", "model_ema", "state_dict", "model"), trust_pickle=trust_pickle,
        model_name=entry.name))
    timm_id = entry.timm_id
    if entry.qkv_bias_architecture and any(re.fullmatch(_QV_BIAS_KEY, key) for key in raw):
        timm_id = f"{entry.qkv_bias_architecture}.{entry.timm_id.split('.', 1)[1]}"
    what = f"checkpoint {path} for {entry.name} ({timm_id})"
    try:
        with capture_checkpoint_filter() as seen:
            # A copy: filters edit the dict they are given (DINOv2's pops mask_token).
            model = timm.create_model(timm_id, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(raw)},
                                      **kwargs)
    except RuntimeError as err:
        # timm loads strictly: missing or unexpected keys end up here.
        raise PatchAtlasError(
            f"{what} does not fit: {err}. Check that the file holds weights of this architecture."
        ) from err
    if set(seen["given"]) != set(raw):
        raise PatchAtlasError(f"{what}: timm's loader did not pass the file's entries to its checkpoint filter")
    check_nothing_dropped(seen["given"], seen["state"], model, what)
    return model, timm_id


def _hub_file(entry: ModelEntry, cache_dir: str | Path | None) -> Path:
    """The original checkpoint of a mapped model from the Hub (or its cache when offline)."""
    if not entry.hub_file:
        raise WeightsUnavailable(entry.name, f"timm has no weights for it; pass --weights {entry.name}=PATH to its "
                                             f"original {entry.checkpoint_format} checkpoint")
    from huggingface_hub import hf_hub_download

    repo_id, filename = entry.hub_file.rsplit("/", 1)
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=str(cache_dir) if cache_dir else None))
    except (OSError, ConnectionError, ValueError) as err:
        raise WeightsUnavailable(entry.name, f"not in the local Hugging Face cache ({entry.hub_file}); download it "
                                             f"once with network or pass --weights {entry.name}=PATH "
                                             f"({type(err).__name__})") from err


def _hub_revision(repo_id: str, cache_dir: str | Path | None) -> str:
    """The commit of the cached snapshot that was loaded, if the cache records one."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(cache_dir)
        for repo in info.repos:
            if repo.repo_id == repo_id and repo.revisions:
                return sorted(r.commit_hash for r in repo.revisions)[-1]
    except Exception:  # the revision is informative only; a cache we cannot scan is not an error
        pass
    return ""
