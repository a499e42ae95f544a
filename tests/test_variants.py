"""Degraded and transformed variants are stored like the published tables: same dtype, same
range check, and a rerun with another dtype recomputes them."""

from __future__ import annotations

import numpy as np
import pytest

from generator.errors import PatchAtlasError
from generator.extract import ExtractOptions, run_extract, variants_dir
from generator.models.encoder import Encoder
from generator.sources.synthetic import synthetic_scenes


def _options(dtype: str, variants: bool = True) -> ExtractOptions:
    return ExtractOptions(layers="last", norms=("postnorm",), device="cpu", batch_size=4, progress=False,
                          variants=variants, embedding_dtype=dtype, curve_layers="last")


def _variant_files(out, source):
    return sorted(variants_dir(out, source.name, "tiny_random").glob("*.npz"))


def test_variants_take_the_embedding_dtype_and_a_rerun_with_another_recomputes_them(tiny_models, tmp_path):
    source = synthetic_scenes(4, size=64)
    out = tmp_path / "out"
    for dtype in ("float32", "float16"):
        run_extract(out, [source], ["tiny_random"], _options(dtype))
        files = _variant_files(out, source)
        assert len(files) > 10
        for path in files:
            with np.load(path) as npz:
                assert npz["tokens"].dtype == np.dtype(dtype), (path.name, dtype)
                assert np.isfinite(npz["tokens"]).all()


def test_variants_refuse_tokens_beyond_float16_range_naming_model_and_table(tiny_models, tmp_path, monkeypatch):
    source = synthetic_scenes(4, size=64)
    out = tmp_path / "out"
    run_extract(out, [source], ["tiny_random"], _options("float16", variants=False))
    # Tokens too long for float16 from here on; the published tables above are reused as they
    # are, so only the variants pass meets them.
    original = Encoder.tokens

    def huge_tokens(self, *args, **kwargs):
        batch = original(self, *args, **kwargs)
        for toks in batch.layers.values():
            toks.patch = toks.patch * 1e6
        return batch

    monkeypatch.setattr(Encoder, "tokens", huge_tokens)
    with pytest.raises(PatchAtlasError, match=r"tiny_random on synthetic-scenes, variants table degraded-\S+, "
                                              r"layer 2 \(postnorm\): tokens reach .*float16's range"):
        run_extract(out, [source], ["tiny_random"], _options("float16"))
    assert not _variant_files(out, source)
    # float32 holds them.
    run_extract(out, [source], ["tiny_random"], _options("float32"))
    assert _variant_files(out, source)
