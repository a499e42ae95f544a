"""The layout of a dataset repository and its card.

One repository per source dataset, laid out as on the Hugging Face Hub::

    README.md                                    card with YAML `configs:`
    images/train-00000-of-00001.parquet          config "images"
    <model>/L<layer>-<norm>/train-….parquet      config "<model>-L<layer>-<norm>"
    <model>/prefix/train-….parquet               config "<model>-prefix"
    <model>/attention/train-….parquet            config "<model>-attention"

The card's YAML metadata is built as ``huggingface_hub.DatasetCardData`` (licences, size
category, configs with one ``default``) and its Markdown body is rendered from
``data_cards/dataset_card.md.j2``. Nothing in the body is escaped automatically; instead every
string it prints must pass through ``yaml_str`` (a double-quoted scalar, valid YAML and a valid
Python literal) or ``md`` / ``md_inline`` (HTML and Markdown specials escaped), and rendering
fails if one does not.

Licences: the embeddings of a config derive from the images and from the model, so a config is
under both licences. The card lists each config's licences (``config_licenses`` in the YAML and
the table in the body); the repository's ``license`` is that licence when every config has the
same single one, and otherwise ``other`` with a ``license_name`` naming all of them, so a
repository with non-commercial tokens never advertises a permissive licence alone.

The loading example names the Hub repository (``ORG/NAME``); until one is chosen it names the
placeholder ``YOUR_ORG/<dataset>`` (``placeholder_repo_id``) and says so. A local path never
appears: it would work only on the machine that built the folder.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import jinja2
import markupsafe

from generator.assets import data_cards_dir
from generator.errors import PatchAtlasError
from generator.store.atomic import atomic_write_text
from generator.store.layout import IMAGES_CONFIG
from generator.templating import environment

PREFIX_CONFIG_SUFFIX = "-prefix"
ATTENTION_CONFIG_SUFFIX = "-attention"
PREFIX_DIR = "prefix"
ATTENTION_DIR = "attention"
CARD_TEMPLATE = "dataset_card.md.j2"
CARD_FILE = "README.md"
PLACEHOLDER_ORG = "YOUR_ORG"
HUB_DATASETS_URL = "https://huggingface.co/datasets"
# Licence ids the Hub knows (https://huggingface.co/docs/hub/repositories-licenses) that the
# atlas' sources and models use; any other licence is published as ``other`` with its name.
HUB_LICENSE_IDS = frozenset({
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0",
    "cc-by-nc-4.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0", "odc-by", "odbl", "openrail", "unknown",
    "llama2", "llama3", "gemma",
})
# The Hub's size_categories, by the row count of the largest config.
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                    (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"))

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
    resize: str = "squash"  # how images became the input (generator/sources/geometry.py)


def _only_filtered(value):
    # With autoescaping off, a string printed without a filter could break the YAML or inject
    # HTML; Markup marks the output of the filters above.
    if isinstance(value, str) and not isinstance(value, markupsafe.Markup):
        raise PatchAtlasError(f"{CARD_TEMPLATE}: the string {value!r} is printed without yaml_str or md; "
                              f"the template must quote it")
    return value


def _environment() -> jinja2.Environment:
    return environment(data_cards_dir(), autoescape=False, finalize=_only_filtered)


def _check_data_files(config: str, pattern: str) -> None:
    parts = PurePosixPath(pattern).parts
    if not pattern or pattern.startswith("/") or ".." in parts or "\\" in pattern:
        raise PatchAtlasError(f"config {config!r}: data_files {pattern!r} must be a relative path inside the repository")


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def placeholder_repo_id(dataset: str) -> str:
    """What the card names before the dataset has a Hub repository: ``YOUR_ORG/<dataset>``."""
    return f"{PLACEHOLDER_ORG}/{re.sub(r'[^A-Za-z0-9_.-]+', '-', str(dataset)).strip('-.') or 'dataset'}"


def is_placeholder(repo_id: str) -> bool:
    return repo_id.split("/", 1)[0] == PLACEHOLDER_ORG


def check_repo_id(repo_id: str, what: str = "--repo") -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise PatchAtlasError(f"{what} {repo_id!r}: expected ORG/NAME, e.g. my-org/patchatlas-voc")
    return repo_id


def hub_repo_id(dataset: str, hub_repo: str | dict[str, str] | None) -> str:
    """The Hub repository of ``dataset`` from a ``--hub-repo`` value.

    ``ORG`` gives ``ORG/<dataset>``; ``ORG/NAME`` names the repository itself (for one dataset);
    a mapping ``{dataset: "ORG" | "ORG/NAME"}`` gives each dataset its own; nothing (or a
    dataset the mapping lacks) gives the placeholder ``YOUR_ORG/<dataset>``.
    """
    if isinstance(hub_repo, dict):
        hub_repo = hub_repo.get(dataset)
    if not hub_repo:
        return placeholder_repo_id(dataset)
    repo_id = hub_repo if "/" in hub_repo else f"{hub_repo}/{dataset}"
    return check_repo_id(repo_id, "--hub-repo")


def parse_hub_repo(values) -> str | dict[str, str] | None:
    """``--hub-repo`` values: one ``ORG`` / ``ORG/NAME``, or ``DATASET=ORG[/NAME]`` pairs."""
    values = [v for v in (values or ()) if v]
    if not values:
        return None
    pairs = [v for v in values if "=" in v]
    if not pairs:
        if len(values) > 1:
            raise PatchAtlasError(f"--hub-repo given {len(values)} times: give one ORG (or ORG/NAME), or "
                                  f"DATASET=ORG/NAME for each dataset")
        value = values[0]
        check_repo_id(value if "/" in value else f"{value}/x", "--hub-repo")
        return value
    if len(pairs) != len(values):
        raise PatchAtlasError("--hub-repo: mix of ORG and DATASET=ORG/NAME values; use one form")
    mapping = {}
    for pair in pairs:
        dataset, repo = pair.split("=", 1)
        check_repo_id(repo if "/" in repo else f"{repo}/x", f"--hub-repo {pair!r}")
        mapping[_check_name("dataset", dataset.strip())] = repo.strip()
    return mapping


def check_hub_repo_fits(hub_repo: str | dict[str, str] | None, datasets) -> None:
    """Refuse a ``--hub-repo`` that cannot mean what it says for these datasets.

    One ``ORG/NAME`` cannot be the repository of several datasets, and a mapping must name
    only datasets that are there.
    """
    names = sorted(set(datasets))
    if isinstance(hub_repo, str) and "/" in hub_repo and len(names) > 1:
        raise PatchAtlasError(f"--hub-repo {hub_repo!r} names one repository, but there are {len(names)} datasets "
                              f"({', '.join(names)}): give ORG (each gets ORG/<dataset>) or DATASET=ORG/NAME for each")
    if isinstance(hub_repo, dict):
        unknown = sorted(set(hub_repo) - set(names))
        if unknown:
            raise PatchAtlasError(f"--hub-repo names {', '.join(unknown)}, not among the datasets "
                                  f"({', '.join(names) or 'none'}); check the DATASET=ORG/NAME spelling")


def hub_viewer_url(repo_id: str, config: str | None = None) -> str:
    """The Hub page of a dataset repository, or of one config in its viewer."""
    base = f"{HUB_DATASETS_URL}/{repo_id}"
    return base if config is None else f"{base}/viewer/{config}"


def hub_license_id(text: str) -> str | None:
    """The Hub's id for a licence written as ``text``, or None when the Hub has none for it."""
    key = " ".join(str(text).split()).lower()
    return key if key in HUB_LICENSE_IDS else None


def _license_slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.")
    return slug[:60].rstrip("-.") or "unnamed"


def combined_license(licences) -> dict:
    """The card's ``license`` (and ``license_name`` / ``license_details``) for a set of licences.

    One licence the Hub knows is published as it is; anything else (several licences, or one
    the Hub does not know) is ``license: other`` with a ``license_name`` listing every licence.
    """
    distinct = sorted({" ".join(str(t).split()) for t in licences if str(t).strip()}, key=str.lower)
    if not distinct:
        raise PatchAtlasError("dataset card: no licence known for any config")
    if len(distinct) == 1 and hub_license_id(distinct[0]):
        return {"license": hub_license_id(distinct[0])}
    return {"license": "other",
            "license_name": "-and-".join(_license_slug(t) for t in distinct),
            "license_details": "Each config is under every licence listed for it in config_licenses: "
                               + "; ".join(distinct) + "."}


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` value for ``rows`` examples."""
    for bound, label in _SIZE_CATEGORIES:
        if rows < bound:
            return label
    return "n>1T"


def _card_context(source_info: dict, configs: list[ConfigCardInfo], default_repo_id: str | None) -> dict:
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
    by_model_id = {mid: lic for mid, lic in models.values()}
    source_licence = " ".join(str(source_info["license"]).split())
    config_licenses = {IMAGES_CONFIG: [source_licence]}
    for c in configs:
        config_licenses[c.name] = list(dict.fromkeys([source_licence, c.license]))
    for p in extra:
        model_licence = p.get("license") or by_model_id.get(p["model"])
        if not model_licence:
            raise PatchAtlasError(f"dataset card: extra config {p['name']!r} names no licence and its model "
                                  f"{p['model']!r} has no patch config to take it from")
        p["license"] = model_licence
        config_licenses[p["name"]] = list(dict.fromkeys([source_licence, model_licence]))
    repo_id = source_info.get("repo_id") or default_repo_id or placeholder_repo_id(source_info["name"])
    source = {
        "name": source_info["name"], "license": source_licence,
        "description": source_info.get("description", ""), "revision": source_info.get("revision", ""),
        "repo_id": repo_id, "published": not is_placeholder(repo_id), "hub_url": hub_viewer_url(repo_id),
        "classes": list(source_info.get("classes", [])), "ignore_index": source_info.get("ignore_index"),
        "extra_configs": extra,
    }
    example = configs[0].name if configs else extra[0]["name"] if extra else IMAGES_CONFIG
    return {
        "source": source, "configs": [asdict(c) for c in configs], "images_config": IMAGES_CONFIG,
        "images_files": data_files_glob(IMAGES_CONFIG), "example_config": example,
        "models": [{"name": m, "model_id": mid, "license": lic} for m, (mid, lic) in models.items()],
        "listed": listed, "config_licenses": config_licenses,
        "max_rows": max([c.num_rows for c in configs] + [int(source_info.get("num_images") or 0)]),
    }


def card_data(context: dict):
    """The card's YAML metadata as ``huggingface_hub.DatasetCardData``."""
    from huggingface_hub import DatasetCardData

    hub_configs = [{"config_name": name, "data_files": [{"split": "train", "path": pattern}]}
                   for name, pattern in context["listed"]]
    for entry in hub_configs:
        if entry["config_name"] == context["example_config"]:
            # The config load_dataset opens when none is named, the one the example loads.
            entry["default"] = True
    licence = combined_license(lic for lics in context["config_licenses"].values() for lic in lics)
    return DatasetCardData(
        **licence,
        pretty_name=f"PatchAtlas patch embeddings: {context['source']['name']}",
        size_categories=[size_category(context["max_rows"])],
        task_categories=["image-segmentation", "image-feature-extraction"],
        tags=["patchatlas", "vision-transformer", "self-supervised", "patch-embeddings"],
        configs=hub_configs,
        config_licenses=context["config_licenses"],
    )


def render_dataset_card(source_info: dict, configs: list[ConfigCardInfo], *,
                        default_repo_id: str | None = None) -> str:
    """The README.md of a dataset repository.

    ``source_info``: ``name`` and ``license`` (required), ``description``, ``revision``,
    ``repo_id`` (the Hub repository the loading example names; ``default_repo_id``, then
    ``YOUR_ORG/<name>`` when absent), ``num_images``, ``classes`` (dicts with ``id``, ``name``,
    ``super_name``), ``ignore_index``, and ``extra_configs`` (dicts with ``name``, ``model``,
    ``kind``, ``data_files`` and optionally ``license``: the prefix and attention configs).
    ``configs``: one entry per patch config.
    """
    from huggingface_hub import DatasetCard

    context = _card_context(source_info, configs, default_repo_id)
    try:
        body = _environment().get_template(CARD_TEMPLATE).render(**context)
    except jinja2.TemplateNotFound as err:
        raise PatchAtlasError(f"{data_cards_dir() / CARD_TEMPLATE}: card template not found; "
                              f"reinstall PatchAtlas") from err
    except jinja2.UndefinedError as err:
        raise PatchAtlasError(f"dataset card for {source_info['name']!r}: {err}") from err
    return str(DatasetCard(f"---\n{card_data(context).to_yaml()}\n---\n\n{body.lstrip()}"))


def write_dataset_card(repo_root: str | Path, source_info: dict, configs: list[ConfigCardInfo]) -> Path:
    """Render the card into ``<repo_root>/README.md``; it never names ``repo_root`` itself."""
    path = Path(repo_root) / CARD_FILE
    text = render_dataset_card(source_info, configs)
    # An unchanged card is left alone so a rerun touches no file and a push uploads nothing.
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)
    return path
