"""Shared fixtures: tiny models so the whole pipeline runs in seconds on a CPU.

The suite never touches the network: the Hugging Face Hub is put in offline mode before
anything imports it, as it would be on a machine without network access.
"""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

from generator.models.registry import MODELS, ModelEntry  # noqa: E402

# Two-block ViTs at 64 px: the same code paths as the zoo, a thousandth of the compute.
TINY_SUPERVISED = ModelEntry(
    "tiny_vit", "vit_tiny_patch16_224.augreg_in21k", "supervised", 16, 64, 224, 1,
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), model_kwargs={"depth": 2},
    description="two-block ViT-Ti/16 for tests",
)
TINY_REGISTERS = ModelEntry(
    "tiny_reg", "vit_small_patch14_reg4_dinov2.lvd142m", "CL", 14, 56, 518, 5, num_registers=4,
    input_policy="dynamic", model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2},
    description="two-block ViT with 4 registers for tests",
)
TINY_RANDOM = ModelEntry(
    "tiny_random", "vit_tiny_patch16_224", "random", 16, 64, 64, 1, pretrained=False,
    model_kwargs={"depth": 2}, description="untrained two-block ViT for tests",
)
TINY_ENTRIES = (TINY_SUPERVISED, TINY_REGISTERS, TINY_RANDOM)
# Untrained rows of the MIM family: the probe protocol gives MAE (only) BatchNorm before the linear probe.
TINY_MAE = dataclasses.replace(TINY_RANDOM, name="tiny_mae", family="MIM", probe_batchnorm=True)
TINY_SIMMIM = dataclasses.replace(TINY_RANDOM, name="tiny_simmim", family="MIM")


@pytest.fixture
def tiny_models(monkeypatch):
    """Register the tiny models in the zoo for the duration of a test."""
    for entry in TINY_ENTRIES:
        monkeypatch.setitem(MODELS, entry.name, entry)
    return {e.name: e for e in TINY_ENTRIES}


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch, tmp_path_factory):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # An empty private Hub cache: nothing a developer downloaded can make a test pass.
    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    _private_datasets_cache(monkeypatch, tmp_path_factory.mktemp("hf-datasets"))


def _private_datasets_cache(mp: pytest.MonkeyPatch, cache) -> None:
    """A datasets cache of the test's own: a load never reuses what another run prepared."""
    import datasets

    mp.setenv("HF_DATASETS_CACHE", str(cache))
    # datasets reads the variable once, at import; its resolved setting is patched as well.
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


def save_untrained_weights(entry: ModelEntry, path, seed: int) -> dict:
    """Weights of an untrained model saved as a checkpoint file: what tests load as 'pretrained'."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(entry.timm_id, pretrained=False, **entry.create_kwargs())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def offline_tiny_zoo(tmp_path_factory) -> pytest.MonkeyPatch:
    """For module-scoped builds: the tiny models registered, the Hub offline with an empty cache.

    The caller undoes the returned MonkeyPatch when its module is done.
    """
    from huggingface_hub import constants

    mp = pytest.MonkeyPatch()
    for entry in TINY_ENTRIES:
        mp.setitem(MODELS, entry.name, entry)
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    mp.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hub-cache")))
    _private_datasets_cache(mp, tmp_path_factory.mktemp("datasets-cache"))
    return mp


@pytest.fixture(autouse=True)
def _cli_logging_reset():
    """The CLI configures the package's loggers for the process it runs in (a handler, a level,
    no propagation). A build run in-process by a module-scoped fixture or an earlier test must
    not hide a test's own records from ``caplog``: each test starts from the loggers as the
    package leaves them at import."""
    import logging

    def reset():
        for name in ("patchatlas", "generator"):
            logger = logging.getLogger(name)
            logger.handlers[:] = []
            logger.setLevel(logging.NOTSET)
            logger.propagate = True

    reset()
    yield
    reset()


# The tiny build the layer-wise tests share: six synthetic scenes at 64 px, float32 tables (the
# streamed curves are compared with analyses of the published tables), k = 2, k-NN k = 5, no HTML.
TINY_BUILD = ("--source", "synthetic-scenes", "--source-option", "n_images=6", "--source-option", "size=64",
              "--embedding-dtype", "float32", "--k", "2", "--knn-k", "5", "--no-html", "--device", "cpu", "--quiet")


@pytest.fixture(scope="session")
def tiny_builds(tmp_path_factory) -> dict:
    """Two builds shared by the session's tests, to read, never to change (copy the folder
    first): ``streamed`` publishes only the last layer of tiny_random, tiny_mae and tiny_simmim
    (layer 1 comes from the streaming pass), ``published`` every layer of tiny_random and
    tiny_mae. Built once: each build costs more than most of the tests that read it."""
    from generator.cli import main

    mp = offline_tiny_zoo(tmp_path_factory)
    for entry in (TINY_MAE, TINY_SIMMIM):
        mp.setitem(MODELS, entry.name, entry)
    root = tmp_path_factory.mktemp("tiny-builds")
    builds = {"streamed": ("tiny_random,tiny_mae,tiny_simmim", "last"), "published": ("tiny_random,tiny_mae", "all")}
    try:
        for name, (models, layers) in builds.items():
            assert main(["build", "--out", str(root / name), "--models", models, "--layers", layers,
                         *TINY_BUILD]) == 0, f"the shared tiny build {name!r} failed"
    finally:
        mp.undo()
    return {name: root / name for name in builds}
