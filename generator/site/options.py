"""What a render draws: the summary's options and the page options."""

from __future__ import annotations

from dataclasses import dataclass

from generator.errors import PatchAtlasError
from generator.summarize import SummarizeOptions


@dataclass
class RenderOptions(SummarizeOptions):
    """The summary's options (which images, k and view the galleries show) and how pages are drawn."""

    thumb_side: int = 224  # stored size; pages show them smaller and open them full size on click
    build_html: bool = True
    progress: bool = True

    def validate(self) -> RenderOptions:
        """Raise a PatchAtlasError naming the first option with a bad value; changes nothing."""
        super().validate()
        if isinstance(self.thumb_side, bool) or not isinstance(self.thumb_side, int) or self.thumb_side < 16:
            raise PatchAtlasError(f"thumb_side {self.thumb_side!r}: expected a whole number of pixels, at least 16")
        return self
