"""The layout of a dataset repository and its card.

One repository per source dataset, laid out as on the Hugging Face Hub::

    README.md                                    card with YAML `configs:`
    images/train-00000-of-00001.parquet          config "images"
    <model>/L<layer>-<norm>/train-….parquet      config "<model>-L<layer>-<norm>"
    <model>/prefix/train-….parquet               config "<model>-prefix"
    <model>/attention/train-….parquet            config "<model>-attention"
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2
import markupsafe

from generator.assets import data_cards_dir
from generator.store.atomic import atomic_write_text

IMAGES_CONFIG = "images"
PREFIX_CONFIG_SUFFIX = "-prefix"
ATTENTION_CONFIG_SUFFIX = "-attention"
CARD_TEMPLATE = "dataset_card.md.j2"


def config_name(model: str, layer: int, norm: str) -> str:
    return f"{model}-L{layer:02d}-{norm}"


def config_data_dir(model: str, layer: int, norm: str) -> str:
    return f"{model}/L{layer:02d}-{norm}"


def shard_name(index: int = 0, total: int = 1) -> str:
    return f"train-{index:05d}-of-{total:05d}.parquet"


@dataclass
class ConfigCardInfo:
    name: str
    data_files: str  # glob relative to the repository root
    model: str
    model_id: str
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


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def _md(value) -> markupsafe.Markup:
    return markupsafe.Markup(_MD_SPECIAL.sub(r"\\\1", str(markupsafe.escape(str(value)))))


def _yaml_str(value) -> markupsafe.Markup:
    # JSON strings are valid YAML scalars: quotes, colons and newlines in names stay inert.
    return markupsafe.Markup(json.dumps(str(value)))


def render_dataset_card(source_info: dict, configs: list[ConfigCardInfo]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(data_cards_dir())), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters["md"] = _md
    env.filters["yaml_str"] = _yaml_str
    example = configs[0].name if configs else IMAGES_CONFIG
    return env.get_template(CARD_TEMPLATE).render(
        source=source_info, configs=[asdict(c) for c in configs], images_config=IMAGES_CONFIG,
        images_files=f"{IMAGES_CONFIG}/*.parquet", example_config=example,
    )


def write_dataset_card(repo_root: str | Path, source_info: dict, configs: list[ConfigCardInfo]) -> Path:
    path = Path(repo_root) / "README.md"
    text = render_dataset_card(source_info, configs)
    # An unchanged card is left alone so a rerun touches no file and a push uploads nothing.
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)
    return path
