"""The manifest entries that stages hand to each other, as typed records.

A stage writes ``Record(...).to_entry()`` and a later one reads ``Record.from_entry(entry,
where)``: the JSON stays what the manifest has always held (plus ``model_facts``), and a later
stage reads named fields instead of keys, so a missing field fails once, here, with the manifest
file and key in the message rather than as a ``KeyError`` deep inside a page.

Everything a page says about a model is recorded with its extract (``ModelFacts``), so the site
renders from the output folder alone: a model the code no longer knows still has its page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

from generator.errors import PatchAtlasError
from generator.sources.geometry import DEFAULT_RESIZE
from generator.store.layout import IMAGES_CONFIG, SOURCES_PREFIX, extract_prefix, hub_key, key_model
from generator.store.repo import hub_repo_id, placeholder_repo_id


def _require(entry: Any, names: list[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise PatchAtlasError(f"{where}: expected an object, found {type(entry).__name__}; "
                              f"rerun the stage that writes it")
    missing = [name for name in names if name not in entry]
    if missing:
        raise PatchAtlasError(f"{where}: missing {', '.join(missing)}; the entry was written by another "
                              f"version or damaged. Rerun the stage that writes it (or delete the entry)")


def _where(manifest, key: str) -> str:
    return f"{manifest.path}: entry {key!r}"


@dataclass(frozen=True)
class SourceRecord:
    """What later stages need to know of a source without reloading it (``sources/<name>``)."""

    name: str
    revision: str
    license: str
    description: str
    params: dict
    ignore_index: int
    classes: list[dict]  # {"id", "name", ...} per class
    num_images: int
    probes: bool
    probe_train_count: int | None
    skipped_images: list[dict]
    params_hash: str = ""  # the manifest fills it in from ``params``

    @classmethod
    def from_entry(cls, entry: dict, where: str = "manifest entry") -> SourceRecord:
        _require(entry, [f.name for f in fields(cls) if f.name != "params_hash"], where)
        return cls(**{f.name: entry[f.name] for f in fields(cls) if f.name in entry})

    def to_entry(self) -> dict:
        entry = {f.name: getattr(self, f.name) for f in fields(self)}
        if not self.params_hash:
            del entry["params_hash"]
        return entry


@dataclass(frozen=True)
class ModelFacts:
    """What the atlas says of a model, as it was when its tokens were extracted."""

    name: str
    family: str
    description: str
    license: str
    gated: bool
    timm_id: str
    published_id: str  # what published files name: the timm id, a control's name, or "random"
    weights_label: str  # what a page says the weights are
    pretrained: bool
    construction: str  # a calibration control's construction; "" for every other model
    patch_size: int
    native_size: int
    input_policy: str
    num_prefix_tokens: int
    num_registers: int
    mean: list[float]
    std: list[float]

    @classmethod
    def from_model(cls, entry) -> ModelFacts:
        """The facts of a registry row (a ``generator.models.registry.ModelEntry``)."""
        if entry.construction:
            weights_label = f"constructed in code ({entry.construction})"
        else:
            weights_label = entry.timm_id if entry.pretrained else "untrained"
        return cls(name=entry.name, family=entry.family, description=entry.description, license=entry.license,
                   gated=entry.gated, timm_id=entry.timm_id, published_id=entry.published_id,
                   weights_label=weights_label, pretrained=entry.pretrained, construction=entry.construction,
                   patch_size=entry.patch_size, native_size=entry.native_size, input_policy=entry.input_policy,
                   num_prefix_tokens=entry.num_prefix_tokens, num_registers=entry.num_registers,
                   mean=list(entry.mean), std=list(entry.std))

    @classmethod
    def from_params(cls, model: dict, where: str) -> ModelFacts:
        """The facts of an extract recorded before they were: from its token parameters' model row."""
        _require(model, ["name", "family", "timm_id", "patch_size", "native_size", "num_prefix_tokens"], where)
        construction, pretrained = model.get("construction", ""), model.get("pretrained", True)
        if construction:
            published_id, weights_label = model["name"], f"constructed in code ({construction})"
        else:
            published_id = model["timm_id"] if pretrained else "random"
            weights_label = model["timm_id"] if pretrained else "untrained"
        return cls(name=model["name"], family=model["family"], description=model.get("description", ""),
                   license=model.get("license", ""), gated=model.get("gated", False), timm_id=model["timm_id"],
                   published_id=published_id, weights_label=weights_label, pretrained=pretrained,
                   construction=construction, patch_size=model["patch_size"], native_size=model["native_size"],
                   input_policy=model.get("input_policy", "fixed"), num_prefix_tokens=model["num_prefix_tokens"],
                   num_registers=model.get("num_registers", 0), mean=list(model.get("mean", [])),
                   std=list(model.get("std", [])))

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> ModelFacts:
        _require(entry, [f.name for f in fields(cls)], where)
        return cls(**{f.name: entry[f.name] for f in fields(cls)})

    def to_entry(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ConfigRecord:
    """One published patch config of a model: its shards and what they hold."""

    name: str
    paths: list[str]  # relative to the dataset repository, in shard order
    layer: int
    norm: str
    dim: int
    dtype: str
    num_rows: int
    num_bytes: int

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> ConfigRecord:
        _require(entry, [f.name for f in fields(cls)], where)
        return cls(**{f.name: entry[f.name] for f in fields(cls)})

    def to_entry(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ExtractRecord:
    """A model's extract on a source (``extract/<source>/<model>``): done, or skipped with a reason.

    ``params`` are the unit's parameters (the token parameters, with the model row, plus the
    tables asked for); ``files`` the sha256 of every table, relative to the dataset repository.
    """

    status: str
    params: dict
    params_hash: str
    files: dict[str, str]
    model_facts: ModelFacts | None  # None only in records written before the facts were
    reason: str = ""
    # Set when done:
    model: str = ""
    source: str = ""
    configs: tuple[ConfigRecord, ...] = ()
    layers: list[int] | None = None
    grid: list[int] | None = None
    dim: int | None = None
    prefix_paths: list[str] | None = None
    attention_paths: list[str] | None = None
    shards: int | None = None
    weights: dict | None = None
    version: str | None = None

    _DONE_FIELDS = ("model", "source", "configs", "layers", "grid", "dim", "prefix_paths", "attention_paths",
                    "shards", "weights", "version")

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> ExtractRecord:
        _require(entry, ["status", "params", "params_hash", "files"], where)
        done = entry["status"] == "done"
        if done:
            _require(entry, [name for name in cls._DONE_FIELDS if name != "prefix_paths" and name != "attention_paths"],
                     where)
        facts = entry.get("model_facts")
        if facts is not None:
            facts = ModelFacts.from_entry(facts, f"{where}, model_facts")
        elif "model" in entry["params"]:
            facts = ModelFacts.from_params(entry["params"]["model"], f"{where}, params.model")
        values = {name: entry.get(name) for name in cls._DONE_FIELDS} if done else {}
        if done:
            values["configs"] = tuple(ConfigRecord.from_entry(c, f"{where}, configs[{i}]")
                                      for i, c in enumerate(entry["configs"]))
        return cls(status=entry["status"], params=entry["params"], params_hash=entry["params_hash"],
                   files=entry["files"], model_facts=facts, reason=entry.get("reason", ""), **values)

    def to_entry(self) -> dict:
        entry = {"status": self.status, "params": self.params, "params_hash": self.params_hash, "files": self.files}
        if self.reason:
            entry["reason"] = self.reason
        if self.model_facts is not None:
            entry["model_facts"] = self.model_facts.to_entry()
        if self.status == "done":
            entry.update({name: getattr(self, name) for name in self._DONE_FIELDS})
            entry["configs"] = [c.to_entry() for c in self.configs]
        return entry

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def input_size(self) -> int:
        """The side the model was fed, as recorded in the token parameters."""
        return self.params["model"]["input_size"]

    @property
    def resize(self) -> str:
        return self.params.get("resize", DEFAULT_RESIZE)

    @property
    def input(self) -> dict:
        """``{"input_size", "resize"}``: how the tokens' images became the model input."""
        return {"input_size": self.input_size, "resize": self.resize}

    @property
    def label_rule(self) -> str | None:
        return self.params.get("label_rule")

    @property
    def probe_batchnorm(self) -> bool:
        return bool(self.params.get("model", {}).get("probe_batchnorm", False))


@dataclass(frozen=True)
class VariantsRecord:
    """Last-layer tokens of a source's degraded and transformed evaluation images
    (``variants/<source>/<model>``); ``files`` are relative to the output folder."""

    status: str
    params: dict
    params_hash: str
    files: dict[str, str]
    layer: int
    model: str
    source: str
    val_ids: list[str]

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> VariantsRecord:
        _require(entry, [f.name for f in fields(cls)], where)
        return cls(**{f.name: entry[f.name] for f in fields(cls)})

    def to_entry(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --- reading them from a manifest -------------------------------------------------------------

def source_records(manifest) -> list[SourceRecord]:
    """Every source the manifest records, by name."""
    return [SourceRecord.from_entry(entry, _where(manifest, key))
            for key, entry in sorted(manifest.entries(prefix=SOURCES_PREFIX))]


def source_record(manifest, key: str) -> SourceRecord | None:
    entry = manifest.get(key)
    return None if entry is None else SourceRecord.from_entry(entry, _where(manifest, key))


def extract_records(manifest, source: str | None = None) -> Iterator[tuple[str, ExtractRecord]]:
    """``(model, record)`` of every model extract recorded (of one source, or of all), by key.

    The images unit shares the prefix but is no model's extract; it is left out.
    """
    for key, entry in sorted(manifest.entries(prefix=extract_prefix(source))):
        if key_model(key) != IMAGES_CONFIG:
            yield key_model(key), ExtractRecord.from_entry(entry, _where(manifest, key))


def variants_record(manifest, key: str) -> VariantsRecord | None:
    entry = manifest.get(key)
    return None if entry is None else VariantsRecord.from_entry(entry, _where(manifest, key))


# --- the Hub repository a dataset names (``hub/<source>``) -----------------------------------

def record_hub_repo(manifest, source_name: str, hub_repo: str | dict[str, str] | None) -> str:
    """Record the Hub repository ``--hub-repo`` (or ``push --repo``) names for a dataset.

    Without one, the recorded repository (of an earlier run or push) stays; with none recorded
    either, the published files name the placeholder ``YOUR_ORG/<dataset>``.
    """
    recorded = (manifest.get(hub_key(source_name)) or {}).get("repo_id")
    if hub_repo is None or (isinstance(hub_repo, dict) and source_name not in hub_repo):
        return recorded or placeholder_repo_id(source_name)
    repo_id = hub_repo_id(source_name, hub_repo)
    if repo_id != recorded:
        manifest.set(hub_key(source_name), {"repo_id": repo_id})
    return repo_id


def recorded_hub_repo(manifest, source_name: str) -> str:
    """The dataset's Hub repository as recorded, or the placeholder ``YOUR_ORG/<dataset>``."""
    return (manifest.get(hub_key(source_name)) or {}).get("repo_id") or placeholder_repo_id(source_name)
