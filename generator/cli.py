"""The ``patchatlas`` command: thin wrappers over the stages, each rerunnable alone.

``extract`` → ``analyze`` → ``render``, and ``build`` runs all three. Every stage reads and
writes under one output folder (``--out``, default ``./build``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from generator.errors import PatchAtlasError
from generator.store.lock import output_lock

DEFAULT_OUT = "build"

# Named protocols: defaults for several options at once (options given explicitly still win).
PRESETS = {
    "paper-cityscapes": {
        # The local-representations paper's Cityscapes protocol: 72/30 split of 256-px tiles at
        # 224 px, one sampled pixel per patch label (the authors' code), 1-NN on dot products.
        "sources": "paper-cityscapes", "label_rule": "nearest", "layers": "all", "knn_k": 1,
        "knn_similarity": "dot",
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


def _set_offline(offline: bool | None) -> None:
    """Honour --offline/--online before any Hub call; the default follows HF_HUB_OFFLINE."""
    if offline is None:
        return
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = offline  # read at import time; keep it in step with the env
    except ImportError:
        pass


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


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _parse_weights(pairs: tuple[str, ...]) -> dict[str, str]:
    weights = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise PatchAtlasError(f"--weights {pair!r}: expected MODEL=PATH, e.g. dino_vits16=~/ckpt/dino.pth")
        weights[name.strip()] = str(Path(path).expanduser())
    return weights


def _parse_source_options(pairs: tuple[str, ...]) -> dict[str, int | str]:
    options: dict[str, int | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise PatchAtlasError(f"--source-option {pair!r}: expected KEY=VALUE, e.g. n_images=16")
        options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return options


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
        click.option("--layers", default="all", show_default=True,
                     help="'all', 'last', 'quartiles' or block numbers like '4,8,12' (1-based)."),
        click.option("--norms", default="prenorm,postnorm", show_default=True, help="Token views to write."),
        click.option("--curve-layers", default="all", show_default=True,
                     help="Layers of the layer-wise curves (k-NN, k-means, variance, norms); those not in "
                          "--layers are streamed from the extraction pass, and their tokens are not stored."),
        click.option("--label-rule", type=click.Choice(["nearest", "majority"]), default="majority",
                     show_default=True, help="How a patch's label is taken from the mask."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Images per forward pass (default: 256 on CUDA, 16 on CPU)."),
        click.option("--embedding-dtype", type=click.Choice(["float16", "float32"]), default="float16",
                     show_default=True, help="Precision of the published embeddings."),
        click.option("--decode", type=click.Choice(["host", "device"]), default="host", show_default=True,
                     help="Where images are decoded: 'host' (PIL on the CPU) or 'device' (JPEGs with "
                          "torchvision on the model's device, nvJPEG on CUDA; other images as on the host)."),
        click.option("--compile", "compile_blocks", is_flag=True, default=False,
                     help="torch.compile the model's blocks (all but the last, whose attention is recorded). "
                          "The first batches wait for the compiler, so it pays back only on long runs."),
        click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True), default=500, show_default=True,
                     help="Largest Parquet shard, in MB (10^6 bytes)."),
        click.option("--weights", multiple=True, metavar="MODEL=PATH",
                     help="Local checkpoint for a model (repeatable); otherwise the Hub or its cache."),
        click.option("--offline/--online", default=None,
                     help="Only use locally cached weights (default: follow HF_HUB_OFFLINE)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _common(f):
    f = click.option("--device", default="auto", show_default=True, help="'auto', 'cpu' or 'cuda[:N]'.")(f)
    f = click.option("--quiet", is_flag=True, help="No progress bars.")(f)
    return f


def _analyze_options(f):
    f = click.option("--k", "ks", default="4,8,16", show_default=True, help="Comma-separated k for k-means.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--knn-k", type=int, default=1, show_default=True, help="Neighbours of the k-NN probe.")(f)
    f = click.option("--knn-similarity", type=click.Choice(["dot", "cosine", "l2"]), default="dot",
                     show_default=True, help="Similarity of the k-NN probe.")(f)
    f = click.option("--linear-epochs", type=int, default=30, show_default=True,
                     help="Training epochs of the linear probe.")(f)
    return f


def _render_options(f):
    f = click.option("--gallery-images", type=int, default=8, show_default=True,
                     help="Images shown per gallery.")(f)
    f = click.option("--gallery-k", type=int, default=8, show_default=True, help="k shown in galleries.")(f)
    f = click.option("--no-html", is_flag=True, help="Write Markdown pages only; skip `mkdocs build`.")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="patchatlas")
def cli():
    """PatchAtlas: what self-supervised vision transformers see, patch by patch."""


def _do_extract(out, sources, source_options, models, layers, norms, curve_layers, label_rule, batch_size,
                embedding_dtype, decode, compile_blocks, shard_mb, weights, offline, device, quiet, rank=0,
                world_size=1, knn_k=1, knn_similarity="dot"):
    _set_offline(offline)
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
            click.echo(f"skipped input of {source.name}: {skip['path']}: {skip['reason']}", err=True)
    options = ExtractOptions(layers=layers, norms=_split(norms), label_rule=label_rule, batch_size=batch_size,
                             device=_device(device, rank if world_size > 1 else None),
                             weights=_parse_weights(weights), progress=not quiet, embedding_dtype=embedding_dtype,
                             shard_bytes=int(shard_mb * 1e6), rank=rank, world_size=world_size,
                             curve_layers=curve_layers, knn_k=knn_k, knn_similarity=knn_similarity, decode=decode,
                             compile_blocks=compile_blocks)
    outcomes = run_extract(out, loaded, _split(models) if models else list(DEFAULT_MODELS), options)
    for source, rows in outcomes.items():
        for row in rows:
            if row.status == "skipped":
                click.echo(f"skipped {row.model} on {source}: {row.reason}", err=True)
    return outcomes


def _skipped_inputs(out: Path, source_names) -> dict[str, list[dict]]:
    """The input files each source left out, as recorded in the manifest."""
    from generator.store.manifest import Manifest

    manifest = Manifest.load(out / "manifest.json")
    return {name: (manifest.get(f"sources/{name}") or {}).get("skipped_images", []) for name in source_names}


def _do_analyze(out, ks, seed, knn_k, knn_similarity, linear_epochs, device, quiet):
    from generator.analyze import AnalyzeOptions, run_analyze

    try:
        k_values = [int(k) for k in _split(ks)]
    except ValueError:
        raise PatchAtlasError(f"--k {ks!r}: expected comma-separated integers such as 4,8,16") from None
    return run_analyze(out, AnalyzeOptions(ks=k_values, seed=seed, knn_k=knn_k, knn_similarity=knn_similarity,
                                           linear_epochs=linear_epochs, device=_device(device),
                                           progress=not quiet))


def _do_render(out, gallery_images, gallery_k, no_html, quiet=False):
    from generator.site import RenderOptions, run_render

    return run_render(out, RenderOptions(gallery_images=gallery_images, gallery_k=gallery_k, build_html=not no_html,
                                         progress=not quiet))


@cli.command()
@_out_option
@_preset_option
@_config_option
@_extract_options
@click.option("--rank", type=click.IntRange(min=0), default=0, envvar="RANK", show_default=True,
              help="This worker's rank in a distributed extract (torchrun sets RANK).")
@click.option("--world-size", type=click.IntRange(min=1), default=1, envvar="WORLD_SIZE", show_default=True,
              help="Workers sharing the shards (torchrun sets WORLD_SIZE); 1 runs everything here.")
@_common
def extract(out, sources, source_options, models, layers, norms, curve_layers, label_rule, batch_size,
            embedding_dtype, decode, compile_blocks, shard_mb, weights, offline, rank, world_size, device, quiet):
    """Run models over datasets; write patch-embedding dataset repos under OUT/datasets.

    Distributed: `torchrun --nproc-per-node N -m generator.cli extract ...` runs N workers that
    split the (model, shard) jobs and each record their share under OUT/manifest.d; then one
    `patchatlas extract` (or `build`) with the same options merges them and writes the cards.
    """
    worker = (rank, world_size) if world_size > 1 else None
    with output_lock(out, worker=worker):
        outcomes = _do_extract(out, sources, source_options, models, layers, norms, curve_layers, label_rule,
                               batch_size, embedding_dtype, decode, compile_blocks, shard_mb, weights, offline,
                               device, quiet, rank, world_size)
    if worker:
        for source, rows in outcomes.items():
            for row in rows:
                if row.status == "worker":
                    click.echo(f"worker {rank}/{world_size}: {source} × {row.model}: {row.reason}")
        click.echo(f"worker {rank} of {world_size} done; when every worker is, run `patchatlas extract` with the "
                   f"same options (no RANK/WORLD_SIZE) to merge")
    click.echo(f"datasets: {out / 'datasets'}")


@cli.command()
@_out_option
@_preset_option
@_config_option
@_analyze_options
@_common
def analyze(out, ks, seed, knn_k, knn_similarity, linear_epochs, device, quiet):
    """Run the analyses on what `extract` wrote; results go to OUT/results."""
    with output_lock(out):
        done = _do_analyze(out, ks, seed, knn_k, knn_similarity, linear_epochs, device, quiet)
    click.echo(f"results: {out / 'results'} ({len(done)} configs analysed, the rest unchanged)")


@cli.command()
@_out_option
@_config_option
@_render_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
def render(out, gallery_images, gallery_k, no_html, quiet):
    """Render figures and pages from OUT and build the static site into OUT/site."""
    with output_lock(out):
        path = _do_render(out, gallery_images, gallery_k, no_html, quiet)
    click.echo(f"site: {path}")


@cli.command()
@_out_option
@_preset_option
@_config_option
@_extract_options
@_analyze_options
@_render_options
@_common
def build(out, sources, source_options, models, layers, norms, curve_layers, label_rule, batch_size,
          embedding_dtype, decode, compile_blocks, shard_mb, weights, offline, ks, seed, knn_k, knn_similarity, linear_epochs, gallery_images, gallery_k, no_html, device, quiet):
    """extract + analyze + render, resuming whatever is already done."""
    with output_lock(out):
        outcomes = _do_extract(out, sources, source_options, models, layers, norms, curve_layers, label_rule,
                               batch_size, embedding_dtype, decode, compile_blocks, shard_mb, weights, offline,
                               device, quiet, knn_k=knn_k, knn_similarity=knn_similarity)
        _do_analyze(out, ks, seed, knn_k, knn_similarity, linear_epochs, device, quiet)
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
    click.echo(f"  datasets: {(out / 'datasets').resolve()}")
    click.echo(f"  site:     {Path(site).resolve()}" + ("/index.html" if not no_html else ""))


@cli.command()
@_out_option
@click.option("--weights", multiple=True, metavar="MODEL=PATH", help="Local checkpoints to check.")
@click.option("--offline/--online", default=None, help="Check as an offline build would run.")
def doctor(out, weights, offline):
    """Check torch/CUDA, disk, write access, site tools, Hub login and which weights are available."""
    _set_offline(offline)
    from generator.doctor import run_checks

    checks = run_checks(out, _parse_weights(weights))
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

    local = _parse_weights(weights)
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
    from generator.extract import dataset_repo_dir
    from generator.store.push import push_folder

    folder = dataset_repo_dir(out, dataset)
    if not folder.is_dir():
        raise PatchAtlasError(f"--dataset {dataset!r}: {folder} does not exist; run `patchatlas extract "
                              f"--source {dataset} --out {out}` first")
    with output_lock(out):
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
