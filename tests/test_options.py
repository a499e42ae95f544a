"""Options declared once: the command line's choices and defaults are the option records', and
each record's validate() names the option it rejects."""

from __future__ import annotations

import dataclasses

import click
import pytest

from generator.analyses.probes import ProbeProtocol
from generator.analyze import AnalyzeOptions
from generator.cli import cli
from generator.errors import PatchAtlasError
from generator.extract import ExtractOptions
from generator.options import option_choices, option_default
from generator.site import RenderOptions
from generator.summarize import SummarizeOptions


def _comma(values) -> str:
    return ",".join(str(v) for v in values)


# (command, click parameter, record, field, how the command line spells the field's value)
DEFAULTS = [
    ("extract", "layers", ExtractOptions, "layers", str),
    ("extract", "norms", ExtractOptions, "norms", _comma),
    ("extract", "curve_layers", ExtractOptions, "curve_layers", str),
    ("extract", "label_rule", ExtractOptions, "label_rule", str),
    ("extract", "resize", ExtractOptions, "resize", str),
    ("extract", "embedding_dtype", ExtractOptions, "embedding_dtype", str),
    ("extract", "decode", ExtractOptions, "decode", str),
    ("extract", "shard_mb", ExtractOptions, "shard_bytes", lambda size: size / 1e6),
    ("extract", "rank", ExtractOptions, "rank", int),
    ("extract", "world_size", ExtractOptions, "world_size", int),
    ("extract", "knn_k", ProbeProtocol, "knn_k", int),
    ("analyze", "ks", AnalyzeOptions, "ks", _comma),
    ("analyze", "seed", AnalyzeOptions, "seed", int),
    ("analyze", "knn_similarity", ProbeProtocol, "knn_similarity", str),
    ("analyze", "miou_average", ProbeProtocol, "miou_average", str),
    ("analyze", "linear_max_steps", ProbeProtocol, "linear_max_steps", int),
    ("analyze", "linear_weight_decay", ProbeProtocol, "linear_weight_decay", float),
    ("summarize", "gallery_images", SummarizeOptions, "gallery_images", int),
    ("render", "gallery_k", SummarizeOptions, "gallery_k", int),
    ("build", "label_rule", ExtractOptions, "label_rule", str),
    ("build", "gallery_k", SummarizeOptions, "gallery_k", int),
]
# Single-valued options with choices (--norms is a comma-separated list: validate() checks each).
CHOICES = [(command, param, record, name) for command, param, record, name, _ in DEFAULTS
           if "choices" in {f.name: f for f in dataclasses.fields(record)}[name].metadata and name != "norms"]


def _param(command: str, name: str) -> click.Parameter:
    return next(p for p in cli.commands[command].params if p.name == name)


@pytest.mark.parametrize("command,param,record,name,to_cli", DEFAULTS, ids=[f"{c}-{p}" for c, p, *_ in DEFAULTS])
def test_click_default_is_the_records(command, param, record, name, to_cli):
    ctx = click.Context(cli.commands[command])
    assert _param(command, param).get_default(ctx) == to_cli(option_default(record, name))


@pytest.mark.parametrize("command,param,record,name", CHOICES, ids=[f"{c}-{p}" for c, p, *_ in CHOICES])
def test_click_choices_are_the_records(command, param, record, name):
    choices = option_choices(record, name)
    assert len(choices) >= 2
    assert tuple(_param(command, param).type.choices) == choices
    default = option_default(record, name)
    assert default in choices  # the record's own default is one of its values


def test_every_field_with_choices_is_on_the_command_line():
    declared = {(record, f.name) for record in (ExtractOptions, ProbeProtocol)
                for f in dataclasses.fields(record) if "choices" in f.metadata}
    assert declared - {(record, name) for _, _, record, name, _ in DEFAULTS} == set()


def test_help_shows_the_records_defaults():
    help_text = cli.commands["extract"].get_help(click.Context(cli.commands["extract"]))
    assert f"[default: {option_default(ExtractOptions, 'label_rule')}]" in help_text
    assert "(dynamic)" not in help_text


BAD = [
    (ExtractOptions, {"label_rule": "middle"}, "--label-rule 'middle'"),
    (ExtractOptions, {"norms": ("prenorm", "midnorm")}, "--norms 'midnorm'"),
    (ExtractOptions, {"embedding_dtype": "int8"}, "--embedding-dtype 'int8'"),
    (ExtractOptions, {"decode": "gpu"}, "--decode 'gpu'"),
    (ExtractOptions, {"resize": "crop"}, "--resize 'crop'"),
    (ExtractOptions, {"batch_size": 0}, "--batch-size 0"),
    (AnalyzeOptions, {"ks": (1, 4)}, "--k"),
    (AnalyzeOptions, {"seed": "zero"}, "--seed 'zero'"),
    (ProbeProtocol, {"knn_similarity": "manhattan"}, "--knn-similarity 'manhattan'"),
    (ProbeProtocol, {"miou_average": "mean"}, "--miou-average 'mean'"),
    (ProbeProtocol, {"knn_k": 0}, "--knn-k 0"),
    (SummarizeOptions, {"gallery_k": 0}, "gallery-k 0"),
    (SummarizeOptions, {"gallery_norm": "midnorm"}, "gallery-norm 'midnorm'"),
    (RenderOptions, {"gallery_images": -1}, "gallery-images -1"),
    (RenderOptions, {"thumb_side": 2}, "thumb_side 2"),
]


@pytest.mark.parametrize("record,values,message", BAD, ids=[m.split()[0] for _, _, m in BAD])
def test_validate_names_the_bad_option(record, values, message):
    with pytest.raises(PatchAtlasError, match=message.replace("(", r"\(").replace(")", r"\)")):
        record(**values).validate()


@pytest.mark.parametrize("record", [ExtractOptions, AnalyzeOptions, ProbeProtocol, SummarizeOptions, RenderOptions])
def test_validate_changes_nothing(record):
    options = record()
    before = dataclasses.asdict(options)
    assert options.validate() is options
    assert dataclasses.asdict(options) == before


def test_the_batch_size_default_is_filled_in_by_resolved_not_by_validate():
    options = ExtractOptions(device="cpu")
    assert options.validate().batch_size is None
    assert options.resolved().batch_size >= 1 and options.batch_size is None
