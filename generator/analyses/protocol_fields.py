"""The fields of a probe protocol that a k-NN number depends on.

Apart from :class:`generator.analyses.probes.ProbeProtocol` (which needs torch) so that the
render stage can tell which recorded curves may share a chart without importing torch.
"""

# Two k-NN curves may share a chart only if these agree.
KNN_FIELDS: tuple[str, ...] = ("knn_k", "knn_similarity", "miou_average", "label_rule", "train_count")
