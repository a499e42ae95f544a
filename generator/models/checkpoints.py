"""Models timm lacks, loaded from their original checkpoints into a timm architecture.

iBOT, SimMIM, the self-supervised BEiT and torchvision's ViT publish weights under their own
key names. Each format here is one pure function (original state dict in, timm state dict out)
that renames keys by the original code's module names, drops what is not the encoder (heads,
decoders, mask tokens) and refuses keys it does not know. The result loads strictly into the
timm model, so the atlas runs the same ``forward_intermediates`` on every model.

- iBOT (``bytedance/ibot``): its ViT is DINO's, which shares timm's module names; checkpoints
  wrap it as ``backbone.`` (teacher) or ``module.backbone.`` (student), beside ``head.`` (the
  projection heads) and ``masked_embed`` (the student's mask embedding).
- SimMIM ViT-B (``microsoft/SimMIM``): a BEiT-style ViT (q/v biases, layer scale ``gamma_1/2``,
  no absolute position embedding, one relative position bias table shared by all blocks) under
  ``encoder.``, beside ``decoder.`` and ``encoder.mask_token``. timm's ``vit`` cannot express
  the relative position bias, so it maps into timm's ``beit`` with ``use_shared_rel_pos_bias``.
- BEiT pt22k in Hugging Face transformers format: the unilm BEiT renamed by transformers
  (``beit.encoder.layer.N.attention.attention.query/key/value``, ``lambda_1/2`` for the layer
  scale, a shared relative position bias), beside ``lm_head``. Maps into timm's ``beit``.
- torchvision ``vit_b_16``: ``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
  ``encoder.layers.encoder_layer_N`` with a fused ``in_proj`` (q, k, v stacked as timm's
  ``qkv``), ``encoder.ln``, ``heads``.

Classifier heads are dropped everywhere: the timm model is built with ``num_classes=0`` and the
load is strict, so nothing is left randomly initialised.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generator.errors import PatchAtlasError

StateDict = dict[str, torch.Tensor]


class CheckpointMismatch(PatchAtlasError):
    """A checkpoint whose keys do not fit the format or the model it is meant for."""

    def __init__(self, what: str, missing: list[str] = (), unexpected: list[str] = (),
                 shapes: list[str] = (), hint: str = ""):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.shapes = list(shapes)
        self.hint = hint
        parts = [f"{what} does not fit"]
        if self.missing:
            parts.append(f"missing keys: {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys: {_listing(self.unexpected)}")
        if self.shapes:
            parts.append(f"shape mismatches: {_listing(self.shapes)}")
        if hint:
            parts.append(hint)
        super().__init__("; ".join(parts))


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _strip_prefixes(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> StateDict:
    """Remove any of ``prefixes`` from the front of each key, repeatedly (``module.backbone.x``)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    stripped = True
        if key in out:
            raise CheckpointMismatch("checkpoint", unexpected=[key],
                                     hint="two entries name this key once their wrapper prefixes are removed")
        out[key] = value
    return out


def _rename(state: Mapping[str, torch.Tensor], rules: list[tuple[str, str]], drop: list[str],
            what: str) -> StateDict:
    """Rename keys by the first matching ``(regex, replacement)``; drop keys matching ``drop``.

    A key that matches neither is an error: silently ignoring it could hide a model that is not
    the one the format describes.
    """
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    dropped = [re.compile(pattern) for pattern in drop]
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        if any(p.fullmatch(key) for p in dropped):
            continue
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                target = pattern.sub(repl, key)
                if target in out:
                    raise CheckpointMismatch(what, unexpected=[key],
                                             hint=f"another key of the file also maps to {target!r}")
                out[target] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatch(what, unexpected=unknown,
                                 hint="these keys belong to no module the format knows")
    return out


_LINEAR = r"(weight|bias)"
_TIMM_VIT_BLOCK = rf"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.{_LINEAR}"


def ibot_to_timm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """iBOT teacher or student backbone → timm ``VisionTransformer`` keys."""
    state = _strip_prefixes(state, ("module.", "backbone."))
    rules = [
        (r"(cls_token|pos_embed)", r"\1"),
        (rf"patch_embed\.proj\.{_LINEAR}", r"\g<0>"),
        (rf"(norm|fc_norm)\.{_LINEAR}", r"\g<0>"),
        (_TIMM_VIT_BLOCK, r"\g<0>"),
        # Layer scale (init_values > 0) is gamma_1/gamma_2 in iBOT, ls1/ls2.gamma in timm.
        (r"blocks\.(\d+)\.gamma_1", r"blocks.\1.ls1.gamma"),
        (r"blocks\.(\d+)\.gamma_2", r"blocks.\1.ls2.gamma"),
    ]
    drop = [r"head\..*", r"masked_embed"]
    return _rename(state, rules, drop, "iBOT checkpoint")


_BEIT_BLOCK = (
    rf"blocks\.(\d+)\.(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\.{_LINEAR}"
    r"|blocks\.(\d+)\.(attn\.qkv\.weight|attn\.q_bias|attn\.v_bias|gamma_1|gamma_2"
    r"|attn\.relative_position_bias_table)"
)


def simmim_to_timm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """SimMIM ViT (``encoder.`` of ``VisionTransformerForSimMIM``) → timm ``Beit`` keys.

    The SimMIM ViT is BEiT's: its module names are already timm's ``beit`` names once the
    ``encoder.`` prefix is gone. The shared relative position bias is
    ``rel_pos_bias.relative_position_bias_table`` in both.
    """
    state = _strip_prefixes(state, ("module.",))
    encoder = {}
    for key, value in state.items():
        if key.startswith("decoder."):
            continue  # the pixel-shuffle decoder of the pretraining objective
        if not key.startswith("encoder."):
            raise CheckpointMismatch("SimMIM checkpoint", unexpected=[key],
                                     hint="a SimMIM model keeps its ViT under 'encoder.'")
        encoder[key[len("encoder."):]] = value
    rules = [
        (r"(cls_token|pos_embed)", r"\1"),
        (rf"patch_embed\.proj\.{_LINEAR}", r"\g<0>"),
        (rf"(norm|fc_norm)\.{_LINEAR}", r"\g<0>"),
        (r"rel_pos_bias\.relative_position_bias_table", r"\g<0>"),
        (_BEIT_BLOCK, r"\g<0>"),
    ]
    # relative_position_index is a fixed function of the grid; timm rebuilds it.
    drop = [r"mask_token", r".*relative_position_index", r"head\..*"]
    return _rename(encoder, rules, drop, "SimMIM checkpoint")


def beit_to_timm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """BEiT in Hugging Face transformers format → timm ``Beit`` keys.

    transformers splits the unilm ``qkv`` into ``query``/``key``/``value`` (the key has no
    bias; BEiT learns only q and v biases) and calls the layer scale ``lambda_1/2``; the
    splitting is undone here by stacking q, k, v in that order, as the unilm code slices them.
    """
    state = _strip_prefixes(state, ("beit.",))
    layer = r"encoder\.layer\.(\d+)\."
    rules = [
        (r"embeddings\.cls_token", "cls_token"),
        (r"embeddings\.position_embeddings", "pos_embed"),
        (rf"embeddings\.patch_embeddings\.projection\.{_LINEAR}", r"patch_embed.proj.\1"),
        (r"encoder\.relative_position_bias\.relative_position_bias_table",
         "rel_pos_bias.relative_position_bias_table"),
        (rf"{layer}layernorm_before\.{_LINEAR}", r"blocks.\1.norm1.\2"),
        (rf"{layer}layernorm_after\.{_LINEAR}", r"blocks.\1.norm2.\2"),
        (rf"{layer}attention\.output\.dense\.{_LINEAR}", r"blocks.\1.attn.proj.\2"),
        (rf"{layer}intermediate\.dense\.{_LINEAR}", r"blocks.\1.mlp.fc1.\2"),
        (rf"{layer}output\.dense\.{_LINEAR}", r"blocks.\1.mlp.fc2.\2"),
        (rf"{layer}lambda_1", r"blocks.\1.gamma_1"),
        (rf"{layer}lambda_2", r"blocks.\1.gamma_2"),
        (rf"{layer}attention\.attention\.query\.bias", r"blocks.\1.attn.q_bias"),
        (rf"{layer}attention\.attention\.value\.bias", r"blocks.\1.attn.v_bias"),
        (rf"{layer}attention\.attention\.relative_position_bias\.relative_position_bias_table",
         r"blocks.\1.attn.relative_position_bias_table"),
        # Placeholders, stacked into qkv below.
        (rf"{layer}attention\.attention\.(query|key|value)\.weight", r"blocks.\1.attn.\2.weight"),
        # BeitForMaskedImageModeling keeps the final norm outside ``beit.``; BeitModel inside.
        (rf"layernorm\.{_LINEAR}", r"norm.\1"),
        (rf"pooler\.layernorm\.{_LINEAR}", r"fc_norm.\1"),
    ]
    drop = [r"embeddings\.mask_token", r".*relative_position_index", r"lm_head\..*",
            r"classifier\..*"]
    renamed = _rename(state, rules, drop, "BEiT (transformers) checkpoint")
    return _stack_qkv(renamed, "BEiT (transformers) checkpoint")


def _stack_qkv(state: StateDict, what: str) -> StateDict:
    out: StateDict = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(blocks\.\d+\.attn)\.(query|key|value)\.weight", key)
        if match:
            parts.setdefault(match.group(1), {})[match.group(2)] = value
        else:
            out[key] = value
    for prefix, qkv in parts.items():
        absent = [f"{prefix}.{name}.weight" for name in ("query", "key", "value") if name not in qkv]
        if absent:
            raise CheckpointMismatch(what, missing=absent)
        out[f"{prefix}.qkv.weight"] = torch.cat([qkv["query"], qkv["key"], qkv["value"]], dim=0)
    return out


def torchvision_vit_to_timm(state: Mapping[str, torch.Tensor]) -> StateDict:
    """torchvision ``VisionTransformer`` (``vit_b_16`` and kin) → timm ``VisionTransformer`` keys.

    ``nn.MultiheadAttention`` stacks q, k, v in ``in_proj_weight`` in the same order timm's
    ``qkv`` does, so the fused projection carries over unchanged.
    """
    layer = r"encoder\.layers\.encoder_layer_(\d+)\."
    rules = [
        (r"class_token", "cls_token"),
        (r"encoder\.pos_embedding", "pos_embed"),
        (rf"conv_proj\.{_LINEAR}", r"patch_embed.proj.\1"),
        (rf"encoder\.ln\.{_LINEAR}", r"norm.\1"),
        (rf"{layer}ln_1\.{_LINEAR}", r"blocks.\1.norm1.\2"),
        (rf"{layer}ln_2\.{_LINEAR}", r"blocks.\1.norm2.\2"),
        (rf"{layer}self_attention\.in_proj_weight", r"blocks.\1.attn.qkv.weight"),
        (rf"{layer}self_attention\.in_proj_bias", r"blocks.\1.attn.qkv.bias"),
        (rf"{layer}self_attention\.out_proj\.{_LINEAR}", r"blocks.\1.attn.proj.\2"),
        # mlp.0 / mlp.3 since torchvision 0.13; linear_1 / linear_2 in older files.
        (rf"{layer}mlp\.(?:0|linear_1)\.{_LINEAR}", r"blocks.\1.mlp.fc1.\2"),
        (rf"{layer}mlp\.(?:3|linear_2)\.{_LINEAR}", r"blocks.\1.mlp.fc2.\2"),
    ]
    drop = [r"heads\..*"]
    return _rename(state, rules, drop, "torchvision ViT checkpoint")


@dataclass(frozen=True)
class CheckpointFormat:
    """How one original checkpoint family becomes a timm model.

    ``nested_keys``: where the state dict sits inside the file, tried in order (the file's top
    level when none is present). ``model_kwargs``: what ``timm.create_model`` needs, beyond the
    architecture name, for the mapped keys to fit strictly.
    """

    name: str
    architecture: str
    convert: Callable[[Mapping[str, torch.Tensor]], StateDict]
    description: str
    nested_keys: tuple[str, ...] = ()
    model_kwargs: dict = field(default_factory=dict)


# A timm `beit` with one relative position bias shared by all blocks, layer scale 0.1 and the
# final norm on every token: how both SimMIM's ViT-B and BEiT pt22k are built.
SHARED_REL_POS_BEIT_KWARGS = {"use_abs_pos_emb": False, "use_rel_pos_bias": False,
                              "use_shared_rel_pos_bias": True, "init_values": 0.1, "global_pool": "token"}

CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = {
    f.name: f
    for f in [
        CheckpointFormat(
            "ibot", "vit_base_patch16_224", ibot_to_timm,
            "iBOT ViT (checkpoint_teacher.pth / checkpoint_student.pth, or a training checkpoint)",
            # Released backbones sit under 'state_dict'; a training checkpoint holds both
            # networks, and iBOT evaluates the teacher.
            nested_keys=("state_dict", "teacher", "model"),
        ),
        CheckpointFormat(
            "simmim", "beit_base_patch16_224", simmim_to_timm,
            "SimMIM ViT pretraining checkpoint (shared relative position bias, layer scale 0.1)",
            nested_keys=("model", "state_dict"),
            # SimMIM's ViT-B config: USE_APE False, USE_RPB False, USE_SHARED_RPB True,
            # INIT_VALUES 0.1, USE_MEAN_POOLING False (the final norm is applied to every token).
            model_kwargs=SHARED_REL_POS_BEIT_KWARGS,
        ),
        CheckpointFormat(
            "beit_hf", "beit_base_patch16_224", beit_to_timm,
            "BEiT in transformers format (microsoft/beit-base-patch16-224-pt22k: model.safetensors)",
            nested_keys=("model", "state_dict"),
            # The pt22k masked-image-modeling model: shared relative position bias, a final norm
            # over every token (BeitForMaskedImageModeling.layernorm).
            model_kwargs=SHARED_REL_POS_BEIT_KWARGS,
        ),
        CheckpointFormat(
            "torchvision_vit", "vit_base_patch16_224", torchvision_vit_to_timm,
            "torchvision VisionTransformer weights (vit_b_16-IMAGENET1K_V1 .pth)",
            nested_keys=("model", "state_dict"),
        ),
    ]
}


def get_checkpoint_format(name: str) -> CheckpointFormat:
    try:
        return CHECKPOINT_FORMATS[name]
    except KeyError:
        raise PatchAtlasError(
            f"unknown checkpoint format {name!r}; known formats: {', '.join(CHECKPOINT_FORMATS)}"
        ) from None


class PickledCheckpoint(PatchAtlasError):
    """A torch checkpoint that pickles Python objects, read without trusting its origin."""


def read_state_dict_file(path: str | Path, nested_keys: tuple[str, ...] = (), *,
                         trust_pickle: bool = False, model_name: str = "") -> StateDict:
    """The tensors of a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) file.

    Torch files are read with ``weights_only=True``: a file that also pickles Python objects
    (training checkpoints keep their argument namespace or config) is refused unless
    ``trust_pickle`` says its origin is trusted, because unpickling runs code; the refusal names
    the option that grants it for ``model_name``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PatchAtlasError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error types
            raise PatchAtlasError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:
        if trust_pickle:
            raise PatchAtlasError(f"{path} is not a readable torch checkpoint: {err}") from err
        raise PickledCheckpoint(
            f"{path} holds pickled Python objects beside its tensors ({type(err).__name__}). "
            f"Extract the state dict into a tensors-only file, or load it trusting its origin with "
            f"--trust-checkpoint {model_name or 'MODEL'}."
        ) from err
    if isinstance(obj, Mapping):
        for key in nested_keys:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise PatchAtlasError(f"{path} holds a {type(obj).__name__}, not a state dict")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        where = f" (looked for {', '.join(nested_keys)})" if nested_keys else ""
        raise PatchAtlasError(
            f"{path}: entries {_listing(sorted(map(str, not_tensors)))} are not tensors; the state "
            f"dict was not found{where}"
        )
    return dict(obj)


def check_fits(state: Mapping[str, torch.Tensor], model: torch.nn.Module, what: str) -> None:
    """Raise :class:`CheckpointMismatch` unless ``state`` holds exactly the model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatch(what, missing, unexpected, shapes,
                                 hint="check that the file is the model and format named")


def _block_structure_check(state: StateDict, what: str) -> None:
    """Every block must have the same parameters; a block missing one is a truncated file."""
    suffixes: dict[int, set[str]] = {}
    for key in state:
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match:
            suffixes.setdefault(int(match.group(1)), set()).add(match.group(2))
    if not suffixes:
        raise CheckpointMismatch(what, missing=["blocks.0.*"], hint="no transformer block found")
    union = set().union(*suffixes.values())
    depth = max(suffixes) + 1
    missing = [f"blocks.{i}.{s}" for i in range(depth) for s in sorted(union - suffixes.get(i, set()))]
    missing += [k for k in ("cls_token", "patch_embed.proj.weight") if k not in state]
    if missing:
        raise CheckpointMismatch(what, missing=missing)


def load_original_checkpoint(path: str | Path, format_name: str, *,
                             model: torch.nn.Module | None = None,
                             trust_pickle: bool = False, model_name: str = "") -> StateDict:
    """Read an original checkpoint and return it as a timm state dict.

    With ``model``, the result is also checked against it (keys and shapes) and resized to its
    grid where only the input size differs. Raises :class:`PatchAtlasError` naming the file and
    the missing or unexpected keys when the file does not fit.
    """
    fmt = get_checkpoint_format(format_name)
    raw = read_state_dict_file(path, fmt.nested_keys, trust_pickle=trust_pickle, model_name=model_name)
    what = f"checkpoint {Path(path)} (format {fmt.name!r})"
    try:
        state = fmt.convert(raw)
        _block_structure_check(state, what)
        if model is not None:
            state = fit_grid(state, model)
            check_fits(state, model, what)
    except CheckpointMismatch as err:
        if str(Path(path)) in str(err):
            raise
        raise CheckpointMismatch(what, err.missing, err.unexpected, err.shapes,
                                 hint=err.hint or "check that the file is the model and format named") from err
    return state


def fit_grid(state: StateDict, model: torch.nn.Module) -> StateDict:
    """Resample position embeddings / relative position tables when only the input size differs.

    timm's own pretrained loading does the same through each architecture's checkpoint filter.
    """
    expected = model.state_dict()
    out = dict(state)
    pos = out.get("pos_embed")
    if pos is not None and "pos_embed" in expected and pos.shape != expected["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        out["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(model.patch_embed.grid_size),
            num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
        )
    for key, value in state.items():
        if key.endswith("relative_position_bias_table") and key in expected \
                and value.shape != expected[key].shape:
            from timm.layers import resize_rel_pos_bias_table

            module = model.get_submodule(key.rsplit(".", 1)[0])
            out[key] = resize_rel_pos_bias_table(
                value, new_window_size=module.window_size, new_bias_shape=expected[key].shape,
            )
    return out


def create_model_from_checkpoint(path: str | Path, format_name: str, architecture: str | None = None,
                                 *, trust_pickle: bool = False, model_name: str = "",
                                 **create_kwargs) -> torch.nn.Module:
    """Build the timm model for a format and load an original checkpoint into it strictly."""
    import timm

    fmt = get_checkpoint_format(format_name)
    kwargs = {**fmt.model_kwargs, **create_kwargs, "num_classes": 0}
    model = timm.create_model(architecture or fmt.architecture, pretrained=False, **kwargs)
    state = load_original_checkpoint(path, format_name, model=model, trust_pickle=trust_pickle,
                                     model_name=model_name)
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- checkpoints loaded through timm's own checkpoint filters ---------------------------------
#
# timm's filters rename original keys and silently skip some (DINOv3's q/v biases when the
# architecture has none, text towers, anything outside a prefix). A load is accepted only when
# every key of the file reached the model, or is one of the keys below, which the encoder's
# forward provably never reads.

# The embedding that replaces masked patches (DINOv2, DINOv3, EVA MIM): read only under masked
# pretraining; the atlas never masks.
_PRETRAINING_ONLY = re.compile(r"mask_token")
# DINOv3's LinearKMaskedBias multiplies qkv.bias by this buffer (dinov3/layers/attention.py),
# set to 1 for q and v and 0 for k (dinov3/models/vision_transformer.py init). timm keeps q and v
# and drops k: exact only for that mask, so the file's mask is checked to be it.
_QKV_BIAS_MASK = re.compile(r"blocks\.\d+\.attn\.qkv\.bias_mask")
# DINOv3's rotary periods: a function of the architecture's base, rebuilt by timm. Accepted when
# the file's values are timm's (the original stores them in bfloat16, hence the tolerance).
_FUSED_QKV_BIAS = re.compile(r"(blocks\.\d+\.attn\.)qkv\.bias")
_ROPE_PERIODS = re.compile(r"rope_embed\.periods")
_BF16_RTOL = 1e-2

_FILTER_LOCK = threading.Lock()


@contextlib.contextmanager
def capture_checkpoint_filter():
    """While active, timm's pretrained loading records what its checkpoint filter returned.

    The filter runs inside ``timm.create_model``; the state dict it hands to
    ``load_state_dict`` is the only record of which file entries the model received. Both the
    filter's input (``given``: timm copies the state dict it is passed) and its output
    (``state``) are recorded.
    """
    from timm.models import _builder

    seen: dict[str, Mapping[str, torch.Tensor]] = {}
    original = _builder.load_pretrained

    def load_pretrained(model, *args, filter_fn=None, **kwargs):
        def recording_filter(state_dict, model):
            # A copy of what the filter is given (filters pop entries), and what it returns.
            seen["given"] = dict(state_dict)
            out = filter_fn(state_dict, model) if filter_fn is not None else state_dict
            seen["state"] = out
            return out

        return original(model, *args, filter_fn=recording_filter, **kwargs)

    with _FILTER_LOCK:
        _builder.load_pretrained = load_pretrained
        try:
            yield seen
        finally:
            _builder.load_pretrained = original


def _memory_span(tensor: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage, first byte, end byte) of a tensor's elements; None when it has none."""
    if tensor.numel() == 0:
        return None
    start = tensor.data_ptr()
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) + 1
    return tensor.untyped_storage().data_ptr(), start, start + extent * tensor.element_size()


def unconsumed_keys(raw: Mapping[str, torch.Tensor], consumed: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of ``raw`` that did not reach ``consumed`` (what a checkpoint filter returned).

    A key reached it when the filter kept its name (possibly resampled: a position embedding)
    or returned a tensor in its memory (renamed, reshaped or sliced: DINOv3's qkv.bias becomes
    q_bias and v_bias views). A tensor the filter computed anew from several entries keeps
    neither; each filter in use keeps the names of such entries (DINOv2's cls_token).
    """
    spans = [span for span in map(_memory_span, consumed.values()) if span is not None]
    missing = []
    for key, value in raw.items():
        if key in consumed:
            continue
        span = _memory_span(value)
        if span is not None and any(s == span[0] and a < span[2] and span[1] < b for s, a, b in spans):
            continue
        missing.append(key)
    return sorted(missing)


def _expected_qkv_bias_mask(mask: torch.Tensor) -> bool:
    third = mask.shape[-1] // 3
    want = torch.ones_like(mask)
    want[..., third:2 * third] = 0
    return mask.shape[-1] == 3 * third and torch.equal(mask, want)


def _matches_model_periods(value: torch.Tensor, model: torch.nn.Module) -> bool:
    for name, buffer in model.named_buffers():
        if name.endswith("periods") and buffer.shape == value.shape:
            return torch.allclose(value.float(), buffer.float(), rtol=_BF16_RTOL, atol=0)
    return False


def check_nothing_dropped(given: Mapping[str, torch.Tensor], consumed: Mapping[str, torch.Tensor],
                          model: torch.nn.Module, what: str) -> None:
    """Raise :class:`CheckpointMismatch` naming every key of ``given`` (what a checkpoint filter
    was given) that did not reach ``consumed`` (what it returned), unless the forward never
    reads it."""
    lost = []
    for key in unconsumed_keys(given, consumed):
        value = given[key]
        if _PRETRAINING_ONLY.fullmatch(key):
            continue
        if _QKV_BIAS_MASK.fullmatch(key) and _expected_qkv_bias_mask(value):
            continue
        if _ROPE_PERIODS.fullmatch(key) and _matches_model_periods(value, model):
            continue
        lost.append(key)
    for key, value in given.items():
        # timm keeps only the q and v thirds of a fused qkv.bias. Without DINOv3's mask beside
        # it, nothing zeroes the k third by construction, so it must be zero in the file.
        fused = _FUSED_QKV_BIAS.fullmatch(key)
        if fused and key not in consumed and f"{fused.group(1)}qkv.bias_mask" not in given:
            third = value.shape[-1] // 3
            if value[..., third:2 * third].any():
                lost.append(f"{key} (its non-zero k third)")
    if lost:
        raise CheckpointMismatch(
            what, unexpected=lost,
            hint="the architecture's checkpoint filter leaves these entries out, so their weights would "
                 "be lost; pass a file that holds only this model's encoder",
        )
