"""`--compile`: the compiled blocks give the eager tokens (to float rounding), the last block's
attention is still recorded from the same pass, and the option reaches the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generator.batches import load_encoder_for
from generator.extract import ExtractOptions, token_params
from generator.models.encoder import load_encoder

from conftest import TINY_RANDOM


@pytest.mark.filterwarnings("ignore")
def test_compiled_blocks_give_the_eager_tokens_and_attention(tiny_models):
    eager = load_encoder(TINY_RANDOM)
    compiled = load_encoder_for(TINY_RANDOM, ExtractOptions(compile_blocks=True))
    assert compiled.compiled and not eager.compiled
    blocks = list(compiled.model.blocks)
    # Every block but the last is compiled; the last stays eager for the attention record.
    assert all(b._compiled_call_impl is not None for b in blocks[:-1]) and blocks[-1]._compiled_call_impl is None
    rng = np.random.default_rng(0)
    for batch in (3, 2):  # a smaller last batch is a new shape, compiled once more
        images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(batch)]
        pixels = eager.preprocess(images)
        want_tokens, want_attention = eager.tokens_and_attention(pixels, [1, 2])
        got_tokens, got_attention = compiled.tokens_and_attention(pixels, [1, 2])
        for key, want in want_tokens.layers.items():
            torch.testing.assert_close(got_tokens.layers[key].patch, want.patch, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_tokens.layers[key].prefix, want.prefix, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_attention.cls_maps, want_attention.cls_maps, rtol=1e-4, atol=1e-5)
        for view, want in want_attention.views.items():
            torch.testing.assert_close(got_attention.views[view], want, rtol=1e-4, atol=1e-4)
    # Control: the tolerance is far below what separates two different images' tokens.
    other = eager.tokens(eager.preprocess(images[::-1]), [2]).layers[(2, "postnorm")].patch
    assert float((other - want_tokens.layers[(2, "postnorm")].patch).abs().max()) > 0.1


def test_compiling_is_a_token_parameter_and_off_by_default(tiny_models):
    from generator.sources.synthetic import synthetic_scenes

    source = synthetic_scenes(2, 64)
    plain, compiled = ExtractOptions(), ExtractOptions(compile_blocks=True)
    assert not plain.compile_blocks
    assert "compile_blocks" not in token_params(TINY_RANDOM, source, plain)  # earlier outputs stay reusable
    assert token_params(TINY_RANDOM, source, compiled)["compile_blocks"] is True
