"""The argument checks every analysis shares (generator/analyses/_checks.py), reached through
the public analyses that use them: one wording whichever analysis a bad argument reached."""

import numpy as np
import pytest
import torch

from generator.analyses.clusters import kmeans
from generator.analyses.position import locality_curve
from generator.analyses.probes import nearest_neighbours
from generator.analyses.streaming import StreamingKMeans
from generator.analyses.variance import removal_counts_for
from generator.errors import PatchAtlasError


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "4"])
def test_a_count_that_is_not_a_positive_integer_is_refused_the_same_way_by_every_analysis(bad):
    x = torch.randn(8, 3)
    calls = {
        "k": lambda: kmeans(x, bad),
        "chunk_size": lambda: nearest_neighbours(x, x, k=1, chunk_size=bad),
        "n_init": lambda: StreamingKMeans(2, 3, n_init=bad),
        "max_distance": lambda: locality_curve(torch.randn(1, 3, 3, 4), max_distance=bad),
        "dim (the number of features)": lambda: removal_counts_for(bad),
    }
    for name, call in calls.items():
        with pytest.raises(PatchAtlasError) as err:
            call()
        assert str(err.value) == f"{name} {bad!r}: expected a positive integer"


def test_features_of_the_wrong_shape_or_dtype_are_refused_naming_the_argument():
    with pytest.raises(PatchAtlasError, match=r"queries of shape \(4,\): expected a 2-D array"):
        nearest_neighbours(torch.zeros(4), torch.zeros(4, 2), k=1)
    with pytest.raises(PatchAtlasError, match="keys of dtype torch.int64: expected floating point"):
        nearest_neighbours(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.int64), k=1)
    with pytest.raises(PatchAtlasError, match=r"keys of shape \(0, 2\) has 0 rows: at least 1 is needed"):
        nearest_neighbours(torch.zeros(4, 2), torch.zeros(0, 2), k=1)
    with pytest.raises(PatchAtlasError, match="similarity 'manhattan': expected one of"):
        nearest_neighbours(np.zeros((4, 2), np.float32), np.zeros((4, 2), np.float32), k=1, similarity="manhattan")
