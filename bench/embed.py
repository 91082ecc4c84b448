"""Throughput of the activation pass, against the model's ceiling and a plain reference pipeline.

Three measurements on the same slide, model and device, interleaved over repeats (medians reported):
  pipeline   Lumen's full pass end to end: open slide, tissue mask, read + decode + resize in worker
             processes, uint8 to the device, normalise there, model, hook (pooled embedding, per-cell NNLS
             against H), thumbnails, per-slide part file written.
  ceiling    the model alone on the same tiles already in memory (normalised float batches on the device).
  reference  the common way: per-tile read_region in a DataLoader, float32 normalisation on the CPU,
             fp32 model, full layer features copied to the host per batch and appended to HDF5 per batch.

    python bench/make_slide.py --side 8192 --out bench/out/slide-8k.tiff
    python bench/embed.py --slide bench/out/slide-8k.tiff --model capricorn-crc
    python bench/embed.py --slide bench/out/slide-8k.tiff --model torchvision.models:resnet50 --layer layer4
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `python -m precompute` sets it, before torch loads
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.activations import Engine, layer_geometry, pick_device  # noqa: E402
from precompute.concepts import Concepts  # noqa: E402
from precompute.cohort import SlideRecord  # noqa: E402
from precompute.config import RunConfig  # noqa: E402
from precompute.models import default_relu, find_layer, load_model, normalise_on_device  # noqa: E402
from precompute.passes import FullPass, LayerInfo, run_pass  # noqa: E402
from precompute.slides import open_slide  # noqa: E402
from precompute.tile_stream import SlideJob  # noqa: E402
from precompute.tissue import plan_tiles, read_tile  # noqa: E402


def run_pipeline(args, loaded, layer_mod, layer: LayerInfo, device, concepts, out_dir: Path) -> tuple[int, float]:
    cfg = RunConfig(model=args.model, layer=args.layer, tile_px=layer.tile_px, stride_px=layer.tile_px,
                    relu=args.relu, batch_size=args.batch_size, workers=args.workers, min_tissue=args.min_tissue)
    rec = SlideRecord(slide_id="bench", path=Path(args.slide).resolve(), diagnosis=None, mpp=None, patient=None,
                      meta={})
    engine = Engine(loaded.module, loaded.spec, layer_mod, device, relu=cfg.relu, concepts=concepts)
    t0 = time.perf_counter()
    st = run_pass(FullPass(cfg, layer, concepts), [SlideJob(0, rec)], engine, out_dir, "bench",
                  on_tiles=lambda n: None, on_slide=lambda *a: None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    engine.close()
    return st.tiles, dt


def load_tiles(args, tile_px: int) -> np.ndarray:
    with open_slide(args.slide) as s:
        grid = plan_tiles(s, s.file_mpp, tile_px=tile_px, min_tissue=args.min_tissue)
        return np.stack([read_tile(s, grid, i) for i in range(len(grid.coords))]), grid


def run_ceiling(loaded, device, tiles: np.ndarray, batch_size: int) -> float:
    model = loaded.module.to(device).eval()
    batches = [normalise_on_device(torch.from_numpy(tiles[i:i + batch_size]).to(device), loaded.spec)
               for i in range(0, len(tiles), batch_size)]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                  enabled=False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    with torch.inference_mode(), ctx:
        model(batches[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            model(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - t0


class _RefDataset(Dataset):
    """Per-tile read_region at level 0, resized, float32-normalised on the CPU (ImageNet-style)."""

    def __init__(self, path, coords, tile_l0, tile_px, spec):
        self.path, self.coords, self.tile_l0, self.tile_px, self.spec = path, coords, tile_l0, tile_px, spec
        self.slide = None

    def __len__(self):
        return len(self.coords)

    def __getitem__(self, i):
        import openslide

        if self.slide is None:
            self.slide = openslide.OpenSlide(str(self.path))
        size = int(round(self.tile_l0))
        img = self.slide.read_region(tuple(int(v) for v in self.coords[i]), 0, (size, size)).convert("RGB")
        img = img.resize((self.tile_px, self.tile_px), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, np.float32) * self.spec.scale).permute(2, 0, 1)
        mean = torch.tensor(self.spec.mean).view(3, 1, 1)
        std = torch.tensor(self.spec.std).view(3, 1, 1)
        return (x - mean) / std


def run_reference(args, loaded, layer_mod, device, grid, tile_px: int, out_dir: Path) -> float:
    model = loaded.module.to(device).eval()
    feats = {}
    handle = layer_mod.register_forward_hook(lambda m, i, o: feats.__setitem__("a", o))
    ds = _RefDataset(args.slide, grid.coords, grid.tile_l0, tile_px, loaded.spec)
    dl = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
    t0 = time.perf_counter()
    with h5py.File(out_dir / "reference.h5", "w") as f, torch.no_grad():
        ds_out = None
        for x in dl:
            model(x.to(device))
            a = feats["a"].float().cpu().numpy()
            if ds_out is None:
                ds_out = f.create_dataset("features", shape=(0,) + a.shape[1:], maxshape=(None,) + a.shape[1:],
                                          dtype=np.float32, chunks=(1,) + a.shape[1:])
            n0 = ds_out.shape[0]
            ds_out.resize(n0 + len(a), axis=0)
            ds_out[n0:] = a
    dt = time.perf_counter() - t0
    handle.remove()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", required=True)
    ap.add_argument("--model", default="capricorn-crc")
    ap.add_argument("--layer", default=None)
    ap.add_argument("--relu", action="store_true", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-tissue", type=float, default=0.25)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()

    device = pick_device(args.device)
    loaded = load_model(args.model)
    args.layer = args.layer or loaded.spec.default_layer
    args.relu = default_relu(loaded.spec, args.layer) if args.relu is None else args.relu
    layer_mod = find_layer(loaded.module, args.layer)
    tile_px = loaded.spec.input_px
    c, h, w = layer_geometry(loaded.module, layer_mod, tile_px)
    layer = LayerInfo(c, h, w, tile_px)
    concepts = Concepts(np.abs(np.random.default_rng(0).normal(size=(6, c))).astype(np.float32))
    tiles, grid = load_tiles(args, tile_px)
    n = len(tiles)
    print(f"slide {args.slide}: {n} tissue tiles of {tile_px} px; model {args.model} layer {args.layer} "
          f"({c}x{h}x{w}); device {device}; workers {args.workers}; batch {args.batch_size}; "
          f"torch threads {torch.get_num_threads()}")
    times = {"pipeline": [], "ceiling": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            n_pipe, dt = run_pipeline(args, loaded, layer_mod, layer, device, concepts, Path(tmp))
            assert n_pipe == n, (n_pipe, n)
            times["pipeline"].append(dt)
            times["ceiling"].append(run_ceiling(loaded, device, tiles, args.batch_size))
            if not args.skip_reference:
                times["reference"].append(run_reference(args, loaded, layer_mod, device, grid, tile_px, Path(tmp)))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {n / v[-1]:.1f} tiles/s" for k, v in times.items() if v))
    rate = {k: n / statistics.median(v) for k, v in times.items() if v}
    print("\nmedian tiles/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rate.items()))
    print(f"pipeline / ceiling   = {rate['pipeline'] / rate['ceiling']:.3f}")
    if "reference" in rate:
        print(f"pipeline / reference = {rate['pipeline'] / rate['reference']:.3f}")


if __name__ == "__main__":
    main()
