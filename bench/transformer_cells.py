"""Signed ViT activations: the shift/scale/clamp transform on the residual stream vs a post-GELU MLP layer.

A ViT block's output (the residual stream, e.g. timm `blocks.11`) is signed, so Lumen shifts each channel
by a low percentile, scales it by the IQR and clamps at 0 before NMF. The alternative is to hook the MLP's
hidden layer after its GELU (`blocks.11.mlp.act`, 4x wider), which is nearly non-negative by itself
(GELU >= -0.17). This script captures both layers of one ViT on the 32 Kather CRC tiles (8 tissue classes,
../shared/data/tiles/kather-crc), fits the concepts exactly as a run does (concepts.fit_concepts) and
prints side by side:

- share of negative raw values, and share of values the transform clamps to 0;
- NMF relative reconstruction error at K (the same error a run reports);
- how well the concepts separate tissue: normalised mutual information between each tile's dominant
  concept (largest summed NNLS weight) and its tissue class.

    python bench/transformer_cells.py [--arch vit_small_patch16_224] [--weights ckpt.pth] [--k 8]

Without --weights the ViT has seeded random weights (no pretrained weights can be fetched offline);
pass a timm state_dict (e.g. a pathology foundation model) to measure a trained one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.cells import detect_layout, to_grid  # noqa: E402
from precompute.concepts import fit_concepts  # noqa: E402
from precompute.models import ModelSpec, normalise_on_device  # noqa: E402
from precompute.nmf import nnls_rows  # noqa: E402

TILES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiles" / "kather-crc"


def capture(net: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, C, h, w) patch-token grids of the named layers for input x."""
    mods = dict(net.named_modules())
    got: dict[str, torch.Tensor] = {}
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach())) for n in names]
    with torch.inference_mode():
        net(x)
    for h in hooks:
        h.remove()
    return {n: to_grid(a, detect_layout(tuple(a.shape), net)).float() for n, a in got.items()}


def measure(grid: torch.Tensor, labels: np.ndarray, k: int) -> dict:
    b, c, h, w = grid.shape
    cells = grid.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    concepts, facts = fit_concepts(cells, k, 0, 500, "cpu")
    v = cells
    if concepts.shift is not None:
        v = np.maximum((cells - concepts.shift) / concepts.scale, 0)
    wts = nnls_rows(torch.from_numpy(v), torch.from_numpy(concepts.H)).numpy().reshape(b, h * w, k).sum(1)
    return {"channels": c, "negative": float((cells < 0).mean()), "clamped": float((v == 0).mean()),
            "error": facts["nmf_relative_error"], "nmi": normalized_mutual_info_score(labels, wts.argmax(1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="vit_small_patch16_224", help="timm ViT name")
    ap.add_argument("--weights", type=Path, help="timm state_dict (default: seeded random weights)")
    ap.add_argument("--block", type=int, default=-1, help="transformer block (default: the last)")
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    import timm

    torch.manual_seed(0)
    net = timm.create_model(a.arch, pretrained=False, num_classes=0).eval()
    if a.weights:
        net.load_state_dict(torch.load(a.weights, map_location="cpu", weights_only=True), strict=True)
    files = sorted(TILES.glob("*.png"))
    labels = np.array([f.name.split("-")[0] for f in files])
    tiles = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    block = a.block % len(net.blocks)
    names = [f"blocks.{block}", f"blocks.{block}.mlp.act"]
    t0 = time.perf_counter()
    grids = capture(net, names, normalise_on_device(tiles, ModelSpec(name=a.arch)))
    print(f"{a.arch} ({'weights ' + str(a.weights) if a.weights else 'seeded random weights'}), "
          f"{len(files)} Kather tiles, {len(set(labels))} classes, K={a.k}; forward {time.perf_counter() - t0:.1f} s")
    print(f"{'layer':24s} {'channels':>8s} {'negative':>9s} {'clamped':>8s} {'NMF rel err':>11s} {'NMI class':>9s}")
    rows = {n: measure(grids[n], labels, a.k) for n in names}
    for n, r in rows.items():
        print(f"{n:24s} {r['channels']:8d} {r['negative']:9.3f} {r['clamped']:8.4f} {r['error']:11.3f} {r['nmi']:9.3f}")
    base, alt = rows[names[0]], rows[names[1]]
    print(f"ratio mlp.act / block: NMF error {alt['error'] / base['error']:.2f}x, NMI {alt['nmi'] / max(base['nmi'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
