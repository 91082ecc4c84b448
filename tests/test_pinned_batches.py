"""DataLoader(pin_memory=True) pins the tile batches' pixels (the batch type provides pin_memory())."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory

from precompute.tile_stream import SlideEnd, TileBatch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_tile_batch_pixels_are_pinned():
    batch = TileBatch(index=0, start=0, pixels=torch.zeros((2, 8, 8, 3), dtype=torch.uint8), thumbs=[b"a", b"b"])
    assert not batch.pixels.is_pinned()
    pinned = pin_memory(batch)
    assert isinstance(pinned, TileBatch) and pinned.pixels.is_pinned() and pinned.thumbs == [b"a", b"b"]
    assert isinstance(pin_memory(SlideEnd(0)), SlideEnd)  # messages without pixels pass through
