"""The layout of a dataset repository and its card.

One repository per source dataset, laid out as on the Hugging Face Hub::

    README.md                                    card with YAML `configs:`
    images/train-00000-of-00001.parquet          config "images"
    <model>/L<layer>-<norm>/train-….parquet      config "<model>-L<layer>-<norm>"
    <model>/prefix/train-….parquet               config "<model>-prefix"
    <model>/attention/train-….parquet            config "<model>-attention"

The card is rendered from ``data_cards/dataset_card.md.j2``. The template mixes YAML and
Markdown, so nothing is escaped automatically; instead every string it prints must pass
through ``yaml_str`` (a double-quoted scalar, valid YAML and a valid Python literal) or
``md`` / ``md_inline`` (HTML and Markdown specials escaped), and rendering fails if one does not.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import jinja2
import markupsafe

from generator.assets import data_cards_dir
from generator.errors import PatchAtlasError
from generator.store.atomic import atomic_write_text

IMAGES_CONFIG = "images"
PREFIX_CONFIG_SUFFIX = "-prefix"
ATTENTION_CONFIG_SUFFIX = "-attention"
PREFIX_DIR = "prefix"
ATTENTION_DIR = "attention"
CARD_TEMPLATE = "dataset_card.md.j2"
CARD_FILE = "README.md"

# Names become folder names and config names: keep them to one plain path component.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise PatchAtlasError(f"{what} {value!r}: use letters, digits and _ . + - only (it names a folder)")
    return value


def _check_layer(layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise PatchAtlasError(f"layer {layer!r}: expected a non-negative integer")
    return layer


def config_name(model: str, layer: int, norm: str) -> str:
    """The config of one model's patch tokens at one layer and view, e.g. ``dino_vits16-L12-postnorm``."""
    return f"{_check_name('model', model)}-L{_check_layer(layer):02d}-{_check_name('norm', norm)}"


def config_data_dir(model: str, layer: int, norm: str) -> str:
    """The folder of that config, relative to the repository root, e.g. ``dino_vits16/L12-postnorm``."""
    return f"{_check_name('model', model)}/L{_check_layer(layer):02d}-{_check_name('norm', norm)}"


def prefix_config_name(model: str) -> str:
    return f"{_check_name('model', model)}{PREFIX_CONFIG_SUFFIX}"


def prefix_data_dir(model: str) -> str:
    return f"{_check_name('model', model)}/{PREFIX_DIR}"


def attention_config_name(model: str) -> str:
    return f"{_check_name('model', model)}{ATTENTION_CONFIG_SUFFIX}"


def attention_data_dir(model: str) -> str:
    return f"{_check_name('model', model)}/{ATTENTION_DIR}"


def shard_name(index: int = 0, total: int = 1) -> str:
    """The Hub's shard naming: ``train-00000-of-00001.parquet``."""
    if not 0 <= index < total:
        raise PatchAtlasError(f"shard {index} of {total}: expected 0 ≤ index < total")
    return f"train-{index:05d}-of-{total:05d}.parquet"


def data_files_glob(data_dir: str) -> str:
    """The ``data_files`` pattern of a config stored in ``data_dir``."""
    return f"{data_dir}/*.parquet"


@dataclass
class ConfigCardInfo:
    """What the card says about one patch config."""

    name: str
    data_files: str  # glob relative to the repository root, e.g. "dino_vits16/L12-postnorm/*.parquet"
    model: str
    model_id: str  # timm id, "random" for untrained weights, or the name of a constructed control
    revision: str
    layer: int
    norm: str
    input_size: int
    patch_size: int
    label_rule: str
    dim: int
    num_rows: int
    num_bytes: int
    license: str
    dtype: str = "float16"  # of the embedding column


def yaml_str(value) -> markupsafe.Markup:
    """A double-quoted scalar that YAML and Python both read back as exactly ``value``.

    JSON string syntax is a subset of both; characters JSON leaves raw but YAML would fold or
    reject (NEL, line/paragraph separators, other non-printables) are escaped as well.
    """
    text = json.dumps(str(value), ensure_ascii=False)
    escaped = "".join(
        ch if ch.isprintable() else (f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        for ch in text)
    return markupsafe.Markup(escaped)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def md(value) -> markupsafe.Markup:
    """Text shown as text in Markdown: HTML specials become entities, Markdown specials are escaped."""
    return markupsafe.Markup(_MD_SPECIAL.sub(r"\\\1", str(markupsafe.escape(str(value)))))


def md_inline(value) -> markupsafe.Markup:
    """``md`` on one line, for headings and table cells."""
    return md(" ".join(str(value).split()))


def _only_filtered(value):
    # With autoescaping off, a string printed without a filter could break the YAML or inject
    # HTML; Markup marks the output of the filters above.
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        raise PatchAtlasError(f"{CARD_TEMPLATE}: the string {value!r} is printed without yaml_str or md; "
                              f"the template must quote it")
    return value


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_cards_dir())), autoescape=False,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        finalize=_only_filtered,
    )
    env.filters.update(yaml_str=yaml_str, md=md, md_inline=md_inline)
    return env


def _check_data_files(config: str, pattern: str) -> None:
    parts = PurePosixPath(pattern).parts
    if not pattern or pattern.startswith("/") or ".." in parts or "\\" in pattern:
        raise PatchAtlasError(f"config {config!r}: data_files {pattern!r} must be a relative path inside the repository")


def _card_context(source_info: dict, configs: list[ConfigCardInfo], default_repo_id: str) -> dict:
    for key in ("name", "license"):
        if not source_info.get(key):
            raise PatchAtlasError(f"dataset card: source_info lacks {key!r}; the card needs the dataset's {key}")
    extra = [dict(p) for p in source_info.get("extra_configs", [])]
    for p in extra:
        missing = [k for k in ("name", "model", "kind", "data_files") if k not in p]
        if missing:
            raise PatchAtlasError(f"dataset card: extra config {p.get('name')!r} lacks {missing}")
    listed = [(IMAGES_CONFIG, data_files_glob(IMAGES_CONFIG))] + [(c.name, c.data_files) for c in configs] + [
        (p["name"], p["data_files"]) for p in extra]
    names = [name for name, _ in listed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PatchAtlasError(f"dataset card for {source_info['name']!r}: configs {duplicates} are listed twice")
    for name, pattern in listed:
        _check_data_files(name, pattern)
    models: dict[str, tuple[str, str]] = {}
    for c in configs:
        models.setdefault(c.model, (c.model_id, c.license))
    source = {
        "name": source_info["name"], "license": source_info["license"],
        "description": source_info.get("description", ""), "revision": source_info.get("revision", ""),
        "repo_id": source_info.get("repo_id") or default_repo_id,
        "classes": list(source_info.get("classes", [])), "ignore_index": source_info.get("ignore_index"),
        "extra_configs": extra,
    }
    example = configs[0].name if configs else extra[0]["name"] if extra else IMAGES_CONFIG
    return {
        "source": source, "configs": [asdict(c) for c in configs], "images_config": IMAGES_CONFIG,
        "images_files": data_files_glob(IMAGES_CONFIG), "example_config": example,
        "models": [{"name": m, "model_id": mid, "license": lic} for m, (mid, lic) in models.items()],
    }


def render_dataset_card(source_info: dict, configs: list[ConfigCardInfo], *, default_repo_id: str = ".") -> str:
    """The README.md of a dataset repository.

    ``source_info``: ``name`` and ``license`` (required), ``description``, ``revision``,
    ``repo_id`` (what the loading example passes to ``load_dataset``; ``default_repo_id`` when
    absent), ``classes`` (dicts with ``id``, ``name``, ``super_name``), ``ignore_index``, and
    ``extra_configs`` (dicts with ``name``, ``model``, ``kind``, ``data_files``: the prefix and
    attention configs). ``configs``: one entry per patch config.
    """
    context = _card_context(source_info, configs, default_repo_id)
    try:
        return _environment().get_template(CARD_TEMPLATE).render(**context)
    except jinja2.TemplateNotFound as err:
        raise PatchAtlasError(f"{data_cards_dir() / CARD_TEMPLATE}: card template not found; "
                              f"reinstall PatchAtlas") from err
    except jinja2.UndefinedError as err:
        raise PatchAtlasError(f"dataset card for {source_info['name']!r}: {err}") from err


def write_dataset_card(repo_root: str | Path, source_info: dict, configs: list[ConfigCardInfo]) -> Path:
    """Render the card into ``<repo_root>/README.md``; the example loads ``repo_root`` unless a repo_id is given."""
    path = Path(repo_root) / CARD_FILE
    text = render_dataset_card(source_info, configs, default_repo_id=str(repo_root))
    # An unchanged card is left alone so a rerun touches no file and a push uploads nothing.
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)
    return path
