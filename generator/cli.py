"""The ``patchatlas`` command: thin wrappers over the stages, each rerunnable alone.

``extract`` → ``analyze`` → ``summarize`` → ``render``, and ``build`` runs all four. Every stage reads and
writes under one output folder (``--out``, default ``./build``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from generator.errors import ModelsSkipped, PatchAtlasError
from generator.store.layout import dataset_repo_dir, datasets_dir, manifest_path, results_root, source_key
from generator.store.lock import output_lock

DEFAULT_OUT = "build"

log = logging.getLogger("patchatlas")

# What `patchatlas[full]` adds to the base (read-only) install; see pyproject.toml.
FULL_INSTALL_MODULES = {"torch", "torchvision", "timm", "sklearn", "scipy", "jinja2", "mkdocs", "material",
                        "matplotlib"}

# Named protocols: defaults for several options at once (options given explicitly still win).
PRESETS = {
    "paper-cityscapes": {
        # The local-representations paper's Cityscapes protocol: 72/30 split of 256-px tiles at
        # 224 px, one sampled pixel per patch label (the authors' code), 1-NN on dot products,
        # mIoU averaged as cityscapesScripts does (a class predicted but absent scores 0).
        # A tile is square, so short-side-crop only resizes it, bicubic as PIL does.
        "sources": "paper-cityscapes", "label_rule": "nearest", "layers": "all", "knn_k": 1,
        "knn_similarity": "dot", "miou_average": "cityscapes", "resize": "short-side-crop",
    },
    "paper-ade20k": {
        # The same probe settings on ADE20K: train images from the training split, val images
        # from the validation split, each at its own size.
        "sources": "paper-ade20k", "label_rule": "nearest", "layers": "all", "knn_k": 1,
        "knn_similarity": "dot",
    },
}


# ctx.meta key of the values read from --config: they stay above a preset's, in either order.
CONFIG_DEFAULTS = "patchatlas.config_defaults"


def _apply_preset(ctx, param, value):
    # Eager, so the preset's defaults are in place before the other options are read.
    if value:
        ctx.default_map = {**(ctx.default_map or {}), **PRESETS[value], **ctx.meta.get(CONFIG_DEFAULTS, {})}
    return value


def _preset_option(f):
    return click.option("--preset", type=click.Choice(sorted(PRESETS)), is_eager=True, expose_value=False,
                        callback=_apply_preset,
                        help="A named protocol setting several defaults, e.g. paper-cityscapes "
                             "(with --source-option path=/path/to/cityscapes).")(f)


def _apply_config(ctx, param, value):
    # Eager like --preset: the file's values become defaults, so the command line still wins.
    if value:
        from generator.config_file import CONFIG_COMMANDS, config_defaults

        group = ctx.parent.command if ctx.parent else None
        commands = {name: group.commands[name] for name in CONFIG_COMMANDS if name in getattr(group, "commands", {})}
        values = config_defaults(value, ctx.command.name, commands or {ctx.command.name: ctx.command})
        ctx.meta[CONFIG_DEFAULTS] = values
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def _config_option(f):
    return click.option("--config", type=click.Path(dir_okay=False, path_type=Path), is_eager=True,
                        expose_value=False, callback=_apply_config, metavar="FILE",
                        help="A TOML file of option values (see examples/patchatlas.toml); options given on the "
                             "command line win over it, and it wins over --preset.")(f)


def _offline_env(offline: bool) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = offline  # read at import time; keep it in step with the env
    except ImportError:
        pass
    if "datasets.config" in sys.modules:  # datasets, too, reads the variable once at import
        sys.modules["datasets.config"].HF_HUB_OFFLINE = offline


def _set_offline(offline: bool | None) -> None:
    """Honour --offline/--online before any Hub call; the default follows HF_HUB_OFFLINE.

    An online run probes the Hub once (a 3 s connection): unreachable, ``--online`` fails at
    once, and the default switches the run to the local cache with one warning, rather than
    every model retrying for ~55 s and being skipped in silence.
    """
    if offline is not None:
        _offline_env(offline)
    from generator.sources.hub import _offline_flag, probe_hub

    if _offline_flag():
        return
    probe = probe_hub()
    if probe.reachable:
        log.info("Hugging Face Hub %s", probe.describe())
        return
    if offline is False:
        raise PatchAtlasError(f"Hugging Face Hub unreachable ({probe.endpoint}: {probe.error}); run with "
                              f"HF_HUB_OFFLINE=1 (or --offline) to use the local cache only, or --online after "
                              f"fixing the network")
    log.warning("Hugging Face Hub unreachable (%s: %s); this run uses the local cache only, as with "
                "HF_HUB_OFFLINE=1 (--online makes this an error)", probe.endpoint, probe.error)
    _offline_env(True)


def _offline_first(ctx, _param, offline):
    # Eager: the Hub is probed before the other options' defaults are read from the option
    # records (whose modules import torch), so an unreachable Hub with --online fails at once.
    if not ctx.resilient_parsing:
        _set_offline(offline)
    return offline


def _device(name: str, worker_rank: int | None = None) -> str:
    import torch

    if name in ("auto", "cuda") and worker_rank is not None and torch.cuda.is_available():
        # One GPU per worker: torchrun's LOCAL_RANK on multi-GPU nodes, else the global rank.
        local = int(os.environ.get("LOCAL_RANK", worker_rank))
        return f"cuda:{local % torch.cuda.device_count()}"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PatchAtlasError(f"device {name!r}: CUDA is not available here; use --device cpu")
    return name


def _progress(quiet: bool) -> bool:
    # Bars only for a person watching: in a log file or CI they are thousands of \r-lines.
    return not quiet and sys.stderr.isatty()


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_weights(pairs: tuple[str, ...], must_exist: bool = True) -> dict[str, str]:
    weights = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise PatchAtlasError(f"--weights {pair!r}: expected MODEL=PATH, e.g. dino_vits16=~/ckpt/dino.pth")
        name = name.strip()
        weights[name] = str(Path(path).expanduser())
        if must_exist:
            from generator.models.registry import get_model_entry

            get_model_entry(name)  # an unknown name is the first thing to say
            if not Path(weights[name]).is_file():
                raise PatchAtlasError(f"--weights {pair}: no such file {weights[name]}; check the path")
    return weights


def _parse_source_options(pairs: tuple[str, ...]) -> dict[str, int | str]:
    options: dict[str, int | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PatchAtlasError(f"--source-option {pair!r}: expected KEY=VALUE, e.g. n_images=16")
        options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return options


def _parse_input_size(value: str | None) -> int | dict[str, int] | None:
    """``--input-size``: None, one side for every model, or MODEL=SIDE pairs."""
    if value is None or not str(value).strip():
        return None
    text = str(value).strip()
    try:
        if "=" not in text:
            return int(text)
        pairs = [pair.partition("=") for pair in _split(text)]
        if any(not sep or not name.strip() for name, sep, _ in pairs):
            raise ValueError
        return {name.strip(): int(side) for name, _, side in pairs}
    except ValueError:
        raise PatchAtlasError(f"--input-size {value!r}: expected a number of pixels (448) or MODEL=SIZE pairs "
                              f"separated by commas (dinov2_vits14_reg=518,dino_vits16=448)") from None


# Option choices and defaults are declared once, on the option records' fields
# (generator/options.py); the commands read them from there when first needed: the records'
# modules import torch, which declaring the commands (and the read-only ones) must not.
_RECORDS = {"extract": ("generator.extract", "ExtractOptions"), "analyze": ("generator.analyze", "AnalyzeOptions"),
            "probe": ("generator.analyses.probes", "ProbeProtocol"),
            "summary": ("generator.summarize", "SummarizeOptions")}


def option_record(kind: str):
    import importlib

    module, name = _RECORDS[kind]
    return getattr(importlib.import_module(module), name)


class _RecordDefault:
    """A click default read from an option record's field (``to_cli`` spells it as the option
    takes it); click calls it when the default is needed, and help shows ``str`` of it."""

    def __init__(self, kind: str, name: str, to_cli=lambda value: value):
        self.kind, self.name, self.to_cli = kind, name, to_cli

    def __call__(self):
        from generator.options import option_default

        return self.to_cli(option_default(option_record(self.kind), self.name))

    def __str__(self) -> str:
        return str(self())


class _RecordChoice(click.Choice):
    """``click.Choice`` of an option record's field choices, read on first use."""

    def __init__(self, kind: str, name: str):  # no super().__init__: ``choices`` is read lazily
        self.kind, self.name, self.case_sensitive = kind, name, True

    @property
    def choices(self) -> tuple[str, ...]:
        from generator.options import option_choices

        return option_choices(option_record(self.kind), self.name)


def _comma_list(values) -> str:
    return ",".join(str(v) for v in values)


def _out_option(f):
    return click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
                        show_default=True, help="Output folder: datasets, results, docs and site.")(f)


def _extract_options(f):
    options = [
        click.option("--source", "sources", default="synthetic-scenes,content-free", show_default=True,
                     help="Comma-separated dataset names (see `patchatlas datasets`)."),
        click.option("--source-option", "source_options", multiple=True, metavar="KEY=VALUE",
                     help="Parameter of a source, e.g. n_images=32 (repeatable); applies to every "
                          "source that has that parameter."),
        click.option("--models", default=None, help="Comma-separated model names (default: the default set)."),
        click.option("--layers", default=_RecordDefault("extract", "layers"), show_default=True,
                     help="'all', 'last', 'quartiles' or block numbers like '4,8,12' (1-based)."),
        click.option("--norms", default=_RecordDefault("extract", "norms", _comma_list), show_default=True,
                     help="Token views to write (comma-separated)."),
        click.option("--curve-layers", default=_RecordDefault("extract", "curve_layers"), show_default=True,
                     help="Layers of the layer-wise curves (k-NN, k-means, variance, norms); those not in "
                          "--layers are streamed from the extraction pass, and their tokens are not stored."),
        click.option("--label-rule", type=_RecordChoice("extract", "label_rule"),
                     default=_RecordDefault("extract", "label_rule"), show_default=True, help="How a patch's label is taken from the mask."),
        click.option("--resize", type=_RecordChoice("extract", "resize"), default=_RecordDefault("extract", "resize"),
                     show_default=True, help="How an image becomes the square model input: 'squash' (the whole "
                          "image resized to the input square) or 'short-side-crop' (short side resized to the "
                          "input size, centre square kept, as timm's and DINO's eval transforms). Masks follow."),
        click.option("--input-size", default=None, metavar="SIZE|MODEL=SIZE,...",
                     help="Input side in pixels, a multiple of the patch size: one number for every model "
                          "(448) or per model (dinov2_vits14_reg=518,dino_vits16=448); default: the registry's."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Images per forward pass (default: 256 on CUDA, 16 on CPU)."),
        click.option("--embedding-dtype", type=_RecordChoice("extract", "embedding_dtype"),
                     default=_RecordDefault("extract", "embedding_dtype"), show_default=True, help="Precision of the published embeddings."),
        click.option("--decode", type=_RecordChoice("extract", "decode"), default=_RecordDefault("extract", "decode"),
                     show_default=True,
                     help="Where images are decoded: 'host' (PIL on the CPU) or 'device' (JPEGs with "
                          "torchvision on the model's device, nvJPEG on CUDA; other images as on the host)."),
        click.option("--compile", "compile_blocks", is_flag=True, default=False,
                     help="torch.compile the model's blocks (all but the last, whose attention is recorded). "
                          "The first batches wait for the compiler, so it pays back only on long runs."),
        click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True),
                     default=_RecordDefault("extract", "shard_bytes", lambda size: size / 1e6), show_default=True,
                     help="Largest Parquet shard, in MB (10^6 bytes)."),
        click.option("--weights", multiple=True, metavar="MODEL=PATH",
                     help="Local checkpoint for a model (repeatable); otherwise the Hub or its cache."),
        click.option("--trust-checkpoint", "trust_checkpoints", multiple=True, metavar="MODEL",
                     help="Read this model's checkpoint even though it pickles Python objects (training "
                          "checkpoints with their arguments or config): unpickling runs code, so only for "
                          "files of trusted origin (repeatable)."),
        click.option("--offline/--online", default=None, is_eager=True, callback=_offline_first,
                     help="Only use locally cached weights (default: follow HF_HUB_OFFLINE; an unreachable "
                          "Hub switches the run to the cache with a warning, and is an error with --online)."),
        click.option("--allow-skipped", is_flag=True, default=False,
                     help="Exit 0 even when a model named in --models or --weights was skipped (weights "
                          "unavailable); the skipped models are still listed."),
        click.option("--require-pretrained", is_flag=True, default=False,
                     help="Fail (exit 3) unless at least one pretrained model ran, e.g. in a nightly build."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _hub_repo_option(f):
    # Kept out of the commands' signatures: the value is read where the stages are run.
    def remember(ctx, _param, values):
        ctx.meta["hub_repo"] = values
        return values

    return click.option("--hub-repo", multiple=True, expose_value=False, callback=remember,
                        metavar="ORG|ORG/NAME|DATASET=ORG/NAME",
                        help="Hub repository the published cards and pages name: ORG gives ORG/<dataset>; "
                             "DATASET=ORG/NAME per dataset (repeatable). Default: the one recorded by an "
                             "earlier run or push, else the placeholder YOUR_ORG/<dataset>.")(f)


def _hub_repo():
    from generator.store.repo import parse_hub_repo

    return parse_hub_repo(click.get_current_context().meta.get("hub_repo"))


def _common(f):
    f = click.option("--device", default="auto", show_default=True, help="'auto', 'cpu' or 'cuda[:N]'.")(f)
    f = click.option("--quiet", is_flag=True, help="No progress bars (there are none when stderr is not a terminal).")(f)
    return f


def _analyze_options(f):
    f = click.option("--k", "ks", default=_RecordDefault("analyze", "ks", _comma_list), show_default=True,
                     help="Comma-separated k for k-means.")(f)
    f = click.option("--seed", type=int, default=_RecordDefault("analyze", "seed"), show_default=True)(f)
    return f


def _probe_options(f):
    """The few-shot probe protocol: extract (streamed layer-wise curves) and analyze share it."""
    f = click.option("--knn-k", type=int, default=_RecordDefault("probe", "knn_k"), show_default=True,
                     help="Neighbours of the k-NN probe.")(f)
    f = click.option("--knn-similarity", type=_RecordChoice("probe", "knn_similarity"),
                     default=_RecordDefault("probe", "knn_similarity"), show_default=True,
                     help="Similarity of the k-NN probe.")(f)
    f = click.option("--miou-average", type=_RecordChoice("probe", "miou_average"),
                     default=_RecordDefault("probe", "miou_average"), show_default=True, help="Which classes the probes' mIoU averages: those present in the "
                                             "evaluation labels, or (cityscapesScripts) those present or predicted.")(f)
    f = click.option("--linear-max-steps", type=int, default=_RecordDefault("probe", "linear_max_steps"),
                     show_default=True,
                     help="Most L-BFGS iterations of the linear probe (it stops earlier once converged).")(f)
    f = click.option("--linear-weight-decay", type=float, default=_RecordDefault("probe", "linear_weight_decay"),
                     show_default=True,
                     help="L2 penalty (weight_decay / 2 * ||W||^2) on the linear probe's weights.")(f)
    return f


def _probe_protocol(knn_k, knn_similarity, miou_average, linear_max_steps, linear_weight_decay):
    from generator.analyses.probes import ProbeProtocol

    return ProbeProtocol(knn_k=knn_k, knn_similarity=knn_similarity, miou_average=miou_average,
                         linear_max_steps=linear_max_steps, linear_weight_decay=linear_weight_decay).validate()


def _summary_options(f):
    f = click.option("--gallery-images", type=int, default=_RecordDefault("summary", "gallery_images"),
                     show_default=True, help="Images shown per gallery.")(f)
    f = click.option("--gallery-k", type=int, default=_RecordDefault("summary", "gallery_k"), show_default=True,
                     help="k shown in galleries.")(f)
    return f


def _render_options(f):
    f = _summary_options(f)
    f = click.option("--no-html", is_flag=True, help="Write Markdown pages only; skip `mkdocs build`.")(f)
    return f


class _EchoHandler(logging.Handler):
    # Through click.echo at each record, so the stream is the one in use now (tests swap it), and
    # "warning: ..." lines read like the CLI's "error: ..." ones.
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


def _configure_logging(verbose: int) -> None:
    """Diagnostics go to stderr: warnings always, -v adds progress notes, -vv debug detail."""
    handler = _EchoHandler()
    for logger in (log, logging.getLogger("generator")):
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG)
        logger.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="patchatlas")
@click.option("-v", "--verbose", count=True, help="More diagnostics on stderr (-v notes, -vv debug).")
def cli(verbose):
    """PatchAtlas: what self-supervised vision transformers see, patch by patch."""
    _configure_logging(verbose)


def _do_extract(out, sources, source_options, models, layers, norms, curve_layers, label_rule, resize,
                input_size, batch_size,
                embedding_dtype, decode, compile_blocks, shard_mb, weights, trust_checkpoints, offline, device, quiet, rank=0,
                world_size=1, probe=None):
    weights = _parse_weights(weights)  # a mistyped path fails before any work (the Hub was probed at parsing)
    from generator.extract import ExtractOptions, run_extract
    from generator.models.registry import DEFAULT_MODELS
    from generator.sources.registry import get_source_entry, load_source

    params = _parse_source_options(source_options)
    names = _split(sources)
    accepted = {name: set(get_source_entry(name).default_params) for name in names}
    for key in params:
        if not any(key in keys for keys in accepted.values()):
            raise PatchAtlasError(f"--source-option {key}: none of the sources {', '.join(names)} has this "
                                  f"parameter; see `patchatlas datasets`")
    loaded = [load_source(name, **{k: v for k, v in params.items() if k in accepted[name]}) for name in names]
    for source in loaded:
        for skip in source.skipped:
            log.warning("skipped input of %s: %s: %s", source.name, skip["path"], skip["reason"])
    options = ExtractOptions(layers=layers, norms=_split(norms), label_rule=label_rule, batch_size=batch_size,
                             device=_device(device, rank if world_size > 1 else None),
                             weights=weights, trust_checkpoints=tuple(trust_checkpoints),
                             progress=_progress(quiet), embedding_dtype=embedding_dtype,
                             shard_bytes=int(shard_mb * 1e6), rank=rank, world_size=world_size,
                             curve_layers=curve_layers, decode=decode, compile_blocks=compile_blocks,
                             resize=resize, input_size=_parse_input_size(input_size), hub_repo=_hub_repo(),
                             **({"probe": probe} if probe is not None else {})).validate()
    outcomes = run_extract(out, loaded, _split(models) if models else list(DEFAULT_MODELS), options)
    for source, rows in outcomes.items():
        for row in rows:
            if row.status == "skipped":
                log.warning("skipped %s on %s: %s", row.model, source, row.reason)
    return outcomes


def _check_skips(outcomes, models: str | None, weights: tuple[str, ...], allow_skipped: bool,
                 require_pretrained: bool) -> None:
    """Exit non-zero when a model the command line named did not run.

    Models of the default set skipped for missing weights (the offline demo) leave the exit
    code at 0; they are listed all the same.
    """
    from generator.models.registry import MODELS

    named = set(_split(models)) if models else set()
    named |= {pair.partition("=")[0].strip() for pair in weights}
    rows = [row for rows in outcomes.values() for row in rows]
    skipped = sorted({row.model for row in rows if row.status == "skipped" and row.model in named})
    if skipped and not allow_skipped:
        raise ModelsSkipped(f"{len(skipped)} model(s) named on the command line did not run: {', '.join(skipped)} "
                            f"(reasons above); fix their weights, or pass --allow-skipped to accept a partial run")
    ran = {row.model for row in rows if row.status in ("done", "reused", "worker")}
    if require_pretrained and not any(MODELS[name].pretrained for name in ran if name in MODELS):
        raise ModelsSkipped("--require-pretrained: no pretrained model ran (only untrained baselines, or none); "
                            "see the skipped models above")


def _skipped_inputs(out: Path, source_names) -> dict[str, list[dict]]:
    """The input files each source left out, as recorded in the manifest."""
    from generator.store.manifest import Manifest

    manifest = Manifest.load(manifest_path(out))
    return {name: (manifest.get(source_key(name)) or {}).get("skipped_images", []) for name in source_names}


def _do_analyze(out, ks, seed, probe, device, quiet):
    from generator.analyze import AnalyzeOptions, run_analyze

    try:
        k_values = [int(k) for k in _split(ks)]
    except ValueError:
        raise PatchAtlasError(f"--k {ks!r}: expected comma-separated integers such as 4,8,16") from None
    return run_analyze(out, AnalyzeOptions(ks=k_values, seed=seed, probe=probe, device=_device(device),
                                           progress=_progress(quiet)).validate())


def _do_summarize(out, gallery_images, gallery_k):
    from generator.summarize import SummarizeOptions, run_summarize

    return run_summarize(out, SummarizeOptions(gallery_images=gallery_images, gallery_k=gallery_k).validate())


def _do_render(out, gallery_images, gallery_k, no_html, quiet=False):
    from generator.extract import apply_hub_repo
    from generator.site import RenderOptions, run_render

    options = RenderOptions(gallery_images=gallery_images, gallery_k=gallery_k, build_html=not no_html,
                            progress=_progress(quiet)).validate()
    apply_hub_repo(out, _hub_repo())
    return run_render(out, options)


@cli.command()
@_out_option
@_preset_option
@_config_option
@_extract_options
@_probe_options
@click.option("--rank", type=click.IntRange(min=0), default=_RecordDefault("extract", "rank"), envvar="RANK",
              show_default=True,
              help="This worker's rank in a distributed extract (torchrun sets RANK).")
@click.option("--world-size", type=click.IntRange(min=1), default=_RecordDefault("extract", "world_size"),
              envvar="WORLD_SIZE", show_default=True,
              help="Workers sharing the shards (torchrun sets WORLD_SIZE); 1 runs everything here.")
@_common
@_hub_repo_option
def extract(out, sources, source_options, models, layers, norms, curve_layers, label_rule, resize, input_size,
            batch_size,
            embedding_dtype, decode, compile_blocks, shard_mb, weights, trust_checkpoints, offline, allow_skipped,
            require_pretrained, rank, world_size, device, quiet, **probe_options):
    """Run models over datasets; write patch-embedding dataset repos under OUT/datasets.

    Distributed: `torchrun --nproc-per-node N -m generator.cli extract ...` runs N workers that
    split the (model, shard) jobs and each record their share under OUT/manifest.d; then one
    `patchatlas extract` (or `build`) with the same options merges them and writes the cards.
    """
    worker = (rank, world_size) if world_size > 1 else None
    with output_lock(out, worker=worker):
        outcomes = _do_extract(out, sources, source_options, models, layers, norms, curve_layers, label_rule,
                               resize, input_size, batch_size, embedding_dtype, decode, compile_blocks, shard_mb, weights,
                               trust_checkpoints, offline,
                               device, quiet, rank, world_size, probe=_probe_protocol(**probe_options))
    if worker:
        for source, rows in outcomes.items():
            for row in rows:
                if row.status == "worker":
                    click.echo(f"worker {rank}/{world_size}: {source} × {row.model}: {row.reason}")
        click.echo(f"worker {rank} of {world_size} done; when every worker is, run `patchatlas extract` with the "
                   f"same options (no RANK/WORLD_SIZE) to merge")
    click.echo(f"datasets: {datasets_dir(out)}")
    _check_skips(outcomes, models, weights, allow_skipped, require_pretrained)


@cli.command()
@_out_option
@_preset_option
@_config_option
@_analyze_options
@_probe_options
@_common
def analyze(out, ks, seed, device, quiet, **probe_options):
    """Run the analyses on what `extract` wrote; results go to OUT/results."""
    with output_lock(out):
        done = _do_analyze(out, ks, seed, _probe_protocol(**probe_options), device, quiet)
    click.echo(f"results: {results_root(out)} ({len(done)} configs analysed, the rest unchanged)")


@cli.command()
@_out_option
@_config_option
@_summary_options
def summarize(out, gallery_images, gallery_k):
    """Aggregate OUT/results into the tables and series the site shows (OUT/summary)."""
    with output_lock(out):
        redone = _do_summarize(out, gallery_images, gallery_k)
    click.echo(f"summary: {out / 'summary'}" + ("" if redone else " (up to date)"))


@cli.command()
@_out_option
@_config_option
@_render_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_hub_repo_option
def render(out, gallery_images, gallery_k, no_html, quiet):
    """Render figures and pages from OUT and build the static site into OUT/site.

    The summary is brought up to date first (nothing is recomputed when the results and the
    gallery options are unchanged), so `render` alone after `analyze` shows the new results.
    """
    import generator.site  # noqa: F401  (the render's own dependencies are checked before any work)

    with output_lock(out):
        _do_summarize(out, gallery_images, gallery_k)
        path = _do_render(out, gallery_images, gallery_k, no_html, quiet)
    click.echo(f"site: {path}")


@cli.command()
@_out_option
@_preset_option
@_config_option
@_extract_options
@_analyze_options
@_probe_options
@_render_options
@_common
@_hub_repo_option
def build(out, sources, source_options, models, layers, norms, curve_layers, label_rule, resize, input_size,
          batch_size,
          embedding_dtype, decode, compile_blocks, shard_mb, weights, trust_checkpoints, offline, allow_skipped,
          require_pretrained, ks, seed, gallery_images, gallery_k, no_html, device, quiet, **probe_options):
    """extract + analyze + summarize + render, resuming whatever is already done."""
    probe = _probe_protocol(**probe_options)  # one protocol for the streamed curves and the analyses
    with output_lock(out):
        outcomes = _do_extract(out, sources, source_options, models, layers, norms, curve_layers, label_rule,
                               resize, input_size, batch_size, embedding_dtype, decode, compile_blocks, shard_mb, weights,
                               trust_checkpoints, offline,
                               device, quiet, probe=probe)
        _do_analyze(out, ks, seed, probe, device, quiet)
        _do_summarize(out, gallery_images, gallery_k)
        site = _do_render(out, gallery_images, gallery_k, no_html, quiet)
    click.echo("")
    click.echo("PatchAtlas build finished")
    for source, rows in outcomes.items():
        for row in rows:
            state = {"done": "extracted", "reused": "up to date", "skipped": "SKIPPED"}[row.status]
            detail = f": {row.reason}" if row.reason else f" ({len(row.configs)} configs)"
            click.echo(f"  {source} × {row.model}: {state}{detail}")
    for source, skips in _skipped_inputs(out, outcomes).items():
        for skip in skips:
            click.echo(f"  {source}: SKIPPED input {skip['path']}: {skip['reason']}")
    click.echo(f"  datasets: {datasets_dir(out).resolve()}")
    click.echo(f"  site:     {Path(site).resolve()}" + ("/index.html" if not no_html else ""))
    _check_skips(outcomes, models, weights, allow_skipped, require_pretrained)


@cli.command()
@_out_option
@click.option("--weights", multiple=True, metavar="MODEL=PATH", help="Local checkpoints to check.")
@click.option("--offline/--online", default=None, help="Check as an offline build would run.")
def doctor(out, weights, offline):
    """Check torch/CUDA, disk, write access, site tools, Hub login and which weights are available."""
    if offline is not None:
        _offline_env(offline)  # not _set_offline: the doctor reports the Hub, it does not switch
    from generator.doctor import run_checks

    checks = run_checks(out, _parse_weights(weights, must_exist=False), hub_required=offline is False)
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    for check in checks:
        click.echo(f"[{marks[check.status]}] {check.name:<28} {check.detail}")
    failed = [c for c in checks if c.status == "fail"]
    missing = [c for c in checks if c.status == "warn" and c.name.startswith("weights ")]
    click.echo(f"{len(failed)} problem(s); {len(missing)} model(s) would be skipped for missing weights")
    if failed:
        raise click.exceptions.Exit(1)


@cli.command("models")
@click.option("--weights", multiple=True, metavar="MODEL=PATH", help="Local checkpoints to count as available.")
def models_cmd(weights):
    """List the model zoo: family, size, patch, input, licence, and whether weights are here."""
    from generator.doctor import weights_available
    from generator.models.registry import MODELS, parameter_count

    local = _parse_weights(weights, must_exist=False)
    click.echo(f"{'name':<20} {'family':<10} {'params':>7} {'patch':>5} {'input':>5}  {'licence':<15} {'here':<4} source")
    for entry in MODELS.values():
        source = entry.timm_id if entry.pretrained and not entry.checkpoint_format else (
            f"{entry.checkpoint_format} checkpoint" if entry.checkpoint_format else
            "(constructed)" if entry.construction else "(untrained)")
        here = "yes" if weights_available(entry, local) else "no"
        click.echo(f"{entry.name:<20} {entry.family:<10} {parameter_count(entry) / 1e6:>6.0f}M {entry.patch_size:>5} "
                   f"{entry.input_size:>5}  {entry.license:<15} {here:<4} {source}")


@cli.command("datasets")
def datasets_cmd():
    """List the dataset sources."""
    from generator.sources.registry import SOURCES

    for entry in SOURCES.values():
        defaults = ", ".join(f"{k}={v}" for k, v in entry.default_params.items())
        click.echo(f"{entry.name:<18} {entry.description}  [{defaults}]")


@cli.command()
@_out_option
@click.option("--dataset", required=True, help="Source dataset whose repository OUT/datasets/NAME is pushed.")
@click.option("--repo", "repo_id", required=True, metavar="ORG/NAME", help="Hub dataset repository to push to.")
@click.option("--dry-run", is_flag=True, help="Show what would be uploaded and deleted; write nothing.")
@click.option("--private", is_flag=True, help="Create the repository private (when it does not exist yet).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (default: main).")
def push(out, dataset, repo_id, dry_run, private, revision):
    """Publish OUT/datasets/DATASET to the Hugging Face Hub, uploading only what changed."""
    from generator.extract import apply_hub_repo
    from generator.store.push import push_folder
    from generator.store.repo import check_repo_id

    folder = dataset_repo_dir(out, dataset)
    if not folder.is_dir():
        raise PatchAtlasError(f"--dataset {dataset!r}: {folder} does not exist; run `patchatlas extract "
                              f"--source {dataset} --out {out}` first")
    with output_lock(out):
        if not dry_run:
            # The card's loading example must name the repository it is published as.
            apply_hub_repo(out, {dataset: check_repo_id(repo_id)})
        result = push_folder(folder, repo_id, dry_run=dry_run, private=private, revision=revision)
    plan = result.plan
    for label, paths in (("add", plan.added), ("update", plan.changed), ("delete", plan.deleted)):
        for path in paths:
            click.echo(f"  {label:<6} {path}")
    if dry_run:
        click.echo(f"dry run, nothing written: {repo_id}@{result.revision} would get {plan.summary()}")
    elif plan.is_empty:
        click.echo(f"{repo_id}@{result.revision} is up to date ({len(plan.unchanged)} files)")
    else:
        click.echo(f"pushed {repo_id}@{result.revision}: {plan.summary()} "
                   f"({result.uploaded_bytes:,} bytes uploaded)")
        click.echo(f"  commit: {result.commit_url}")


def main(argv: list[str] | None = None) -> int:
    try:
        # Without standalone mode click returns the code of `Exit` instead of exiting.
        code = cli.main(args=argv, prog_name="patchatlas", standalone_mode=False)
    except PatchAtlasError as err:
        click.echo(f"error: {err}", err=True)
        return getattr(err, "exit_code", 2)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in FULL_INSTALL_MODULES:
            raise
        click.echo(f"error: {err.name} is not installed, and this command needs it: "
                   f"`pip install 'patchatlas[full]'` (the base install only reads datasets)", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
