"""`patchatlas doctor`: what this machine can and cannot do for a build, before one starts."""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MIN_FREE_GIB = 2.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str


def check_torch() -> list[Check]:
    import torch

    checks = [Check("python", "ok", sys.version.split()[0]), Check("torch", "ok", torch.__version__)]
    if torch.cuda.is_available():
        checks.append(Check("cuda", "ok", f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device(s))"))
    else:
        checks.append(Check("cuda", "warn", "no CUDA device: extraction runs on the CPU (fine for the demo)"))
    return checks


def check_output(out: Path) -> list[Check]:
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    free_gib = shutil.disk_usage(probe_dir).free / 2**30
    disk = Check("disk", "ok" if free_gib >= MIN_FREE_GIB else "fail",
                 f"{free_gib:.1f} GiB free at {probe_dir}" + ("" if free_gib >= MIN_FREE_GIB else
                                                              f"; at least {MIN_FREE_GIB} GiB needed"))
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".patchatlas-doctor-"):
            pass
        write = Check("write access", "ok", f"{probe_dir} is writable")
    except OSError as err:
        write = Check("write access", "fail", f"{probe_dir}: {err.strerror}; choose another --out")
    return [disk, write]


def check_site_tools() -> list[Check]:
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401

        return [Check("mkdocs", "ok", f"mkdocs {mkdocs.__version__} with the Material theme")]
    except ImportError as err:
        return [Check("mkdocs", "fail", f"{err.name} is missing: `pip install mkdocs-material`")]


def check_hub(required: bool = False) -> list[Check]:
    """The Hub as a build here would meet it: the mode, and what one probe of the endpoint found."""
    from huggingface_hub import constants, get_token

    from generator.sources.hub import _offline_flag, probe_hub

    token = get_token()  # never printed: only whether there is one
    login = Check("hub login", "ok" if token else "warn",
                  "a token is configured" if token else "no token: gated models (e.g. DINOv3) cannot be downloaded")
    if _offline_flag():
        return [Check("hub mode", "ok", f"offline (HF_HUB_OFFLINE=1): only cached weights; {constants.ENDPOINT} "
                                        f"not probed"), login]
    probe = probe_hub()
    if probe.reachable:
        reach = Check("hub endpoint", "ok", probe.describe())
    else:
        reach = Check("hub endpoint", "fail" if required else "warn",
                      probe.describe() + ("; --online builds fail" if required else
                                          "; a build would read the local cache only (HF_HUB_OFFLINE=1)"))
    return [Check("hub mode", "ok", "online"), reach, login]


def cached_weights(hf_hub_id: str, cache_dir: str | None = None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in WEIGHT_FILES:
        path = try_to_load_from_cache(hf_hub_id, filename, cache_dir=cache_dir)
        if isinstance(path, str):
            return path
    return None


def weights_available(entry, weights: dict[str, str], cache_dir: str | None = None) -> bool:
    """Whether a build here could load the model without a download."""
    from generator.models.registry import weights_hub_id

    if not entry.pretrained:
        return True
    if entry.name in weights:
        return Path(weights[entry.name]).is_file()
    if entry.checkpoint_format:
        if not entry.hub_file:
            return False
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = entry.hub_file.rsplit("/", 1)
        return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir), str)
    hub_id = weights_hub_id(entry)
    return bool(hub_id and cached_weights(hub_id, cache_dir))


def check_weights(weights: dict[str, str], cache_dir: str | None = None) -> list[Check]:
    from generator.models.registry import MODELS, weights_hub_id

    checks = []
    for entry in MODELS.values():
        if entry.construction:
            checks.append(Check(f"weights {entry.name}", "ok", "calibration control, weights constructed in code"))
        elif not entry.pretrained:
            checks.append(Check(f"weights {entry.name}", "ok", "untrained baseline, nothing to load"))
        elif entry.name in weights:
            exists = Path(weights[entry.name]).is_file()
            checks.append(Check(f"weights {entry.name}", "ok" if exists else "fail",
                                f"checkpoint {weights[entry.name]}" + ("" if exists else " not found")))
        elif entry.checkpoint_format:
            found = weights_available(entry, weights, cache_dir)
            checks.append(Check(f"weights {entry.name}", "ok" if found else "warn",
                                f"original checkpoint in the cache ({entry.hub_file})" if found else
                                f"needs its original {entry.checkpoint_format} checkpoint: --weights {entry.name}=PATH"))
        else:
            hub_id = weights_hub_id(entry)
            found = cached_weights(hub_id, cache_dir) if hub_id else None
            checks.append(Check(f"weights {entry.name}", "ok" if found else "warn",
                                f"in the local cache ({hub_id})" if found else
                                f"not cached: needs a download of {hub_id}{' (gated)' if entry.gated else ''} "
                                f"or --weights {entry.name}=PATH"))
    return checks


def run_checks(out: Path, weights: dict[str, str], cache_dir: str | None = None,
               hub_required: bool = False) -> list[Check]:
    return (check_torch() + check_output(out) + check_site_tools() + check_hub(hub_required)
            + check_weights(weights, cache_dir))
