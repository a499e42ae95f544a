"""PatchAtlas: an atlas of what self-supervised vision transformers see, patch by patch."""

__version__ = "0.1.0"
