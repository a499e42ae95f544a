"""Load every config a dataset card lists, with whatever ``datasets`` this Python has.

    python .ci/load_every_config.py FOLDER

Run by tests/test_datasets_floor.py in a separate environment holding the oldest ``datasets``
that pyproject.toml admits, so a published folder is shown to load for its users too. Prints
one JSON line per config (its name, rows and features) and exits non-zero on the first failure.
"""

import json
import re
import sys
from pathlib import Path

import datasets
import yaml


def main(folder: str) -> int:
    card = (Path(folder) / "README.md").read_text(encoding="utf-8")
    front = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    configs = [c["config_name"] for c in yaml.safe_load(front.group(1))["configs"]]
    print(json.dumps({"datasets": datasets.__version__, "configs": len(configs)}), flush=True)
    for name in configs:
        try:
            ds = datasets.load_dataset(folder, name, split="train")
        except Exception as err:  # noqa: BLE001 - report which config failed and why
            print(json.dumps({"config": name, "error": f"{type(err).__name__}: {err}"}), flush=True)
            return 1
        print(json.dumps({"config": name, "rows": len(ds), "features": {k: repr(v) for k, v in ds.features.items()},
                          "first_label": ds[0].get("label")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
