"""The errors PatchAtlas raises on purpose: each names its input and says what to do."""


class PatchAtlasError(Exception):
    """A user-facing error; the CLI prints its message without a traceback."""


class WeightsUnavailable(PatchAtlasError):
    """Pretrained weights for a model cannot be had (offline, gated, or no such file)."""

    def __init__(self, model: str, reason: str):
        self.model = model
        self.reason = reason
        super().__init__(f"{model}: weights unavailable offline ({reason})")


class UnknownName(PatchAtlasError):
    """A model or dataset name that is not in its registry."""


class ModelsSkipped(PatchAtlasError):
    """Models a run was asked for did not run; what did run is written, and the exit code says so."""

    exit_code = 3
