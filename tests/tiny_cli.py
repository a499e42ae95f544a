"""``patchatlas`` with the tests' tiny models registered, for tests that need a real process.

    python tests/tiny_cli.py extract --out OUT --models tiny_random ...

Killing a build, or running workers side by side, needs separate processes; they must see the
same tiny zoo as the in-process tests, which register it with a fixture.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conftest  # noqa: E402  (sets HF_HUB_OFFLINE before the Hub is imported)

# isort: split

from generator.cli import main  # noqa: E402
from generator.models.registry import MODELS  # noqa: E402

if __name__ == "__main__":
    MODELS.update({entry.name: entry for entry in conftest.TINY_ENTRIES})
    sys.exit(main(sys.argv[1:]))
