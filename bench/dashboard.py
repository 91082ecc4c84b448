"""Benchmark: the review dashboard on a 1,000,000-tile atlas, measured in headless Chromium.

1. Builds a large atlas through `precompute.store.AtlasWriter` by resampling the real tiles of a
   small atlas (default /tmp/atlases/breakhis.h5, or --source) with noise: per synthetic slide, tiles
   of one real slide's diagnosis, with jittered 2-D projection, concept weights and model outputs,
   their real thumbnails (re-encoded smaller), a thumbnail mosaic and cluster maps. The dashboard
   never reads embeddings, so they are stored with 8 channels (the file is ~3 GB, 2 GB of it thumbnails).
2. Starts `streamlit run dashboard/app.py` on it, drives Debian's Chromium with Playwright and reports
   the time to first render (page load -> scatter drawn, cold = the atlas is read, warm = a second
   browser session), the latency of each interaction (action -> result drawn and the script idle),
   the server's start (until it answers: it reads the atlas and prepares the overview first, see
   dashboard/warm.py) and its peak resident memory (VmHWM).

    .venv/bin/python bench/dashboard.py                       # build (once) + measure
    .venv/bin/python bench/dashboard.py --tiles 200000 --slides 400

    .venv/bin/python bench/dashboard.py --atlas /tmp/atlases/breakhis.h5   # baseline: a small atlas

The atlas goes to bench/out/ (ignored by git) and is reused when present; results are printed and
written to bench/out/dashboard-<atlas name>.json. Targets: first render < 5 s, interactions < 1 s, < 2 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))

from browser_harness import CHROMIUM, chromium, dashboard_server, idle  # noqa: E402  (the tests' harness)
from dashboard.raster import DEFAULT_POINTS, POINT_CHOICES  # noqa: E402
from precompute.store import Atlas, AtlasWriter  # noqa: E402

GRID = (25, 20)    # tiles per synthetic slide along x, y (500 tiles)
MOSAIC_PX = 16     # thumbnail px per tile in the synthetic slide thumbnails
CELLS = 7          # cluster-map cells per tile side (capricorn-crc: 7 x 7 cells of 32 px)
SCATTER = '[data-testid="stVegaLiteChart"] .marks'  # the overview scatter (svg or canvas)


# -- building the atlas ---------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def build(source: Path, out: Path, n_tiles: int, n_slides: int, seed: int = 0) -> Path:
    """Write a resampled atlas of about n_tiles tiles in n_slides slides; returns its path."""
    rng = np.random.default_rng(seed)
    with Atlas(source) as src:
        attrs = {k: v for k, v in src.attrs.items() if k not in ("format", "format_version", "n_slides", "n_tiles")}
        ss = src.slides()
        cols = ["slide", "weights", "outputs", "probs", "proj", "kmeans_cluster", "tissue_frac", "recon_err"]
        t = src.tiles(cols)
        thumbs = src.thumbnails(range(src.n_tiles))
        k, names = src.k, src.output_names
        clusters = src.group("clusters")
        cattrs = src.group_attrs("clusters")
        protos = src.group("clusters/prototypes")
        crops = src.ragged("clusters/prototypes", "jpeg")
    small = []  # re-encoded thumbnails (smaller file) and 16-px versions for the mosaics
    tiny = np.zeros((len(thumbs), MOSAIC_PX, MOSAIC_PX, 3), np.uint8)
    for i, b in enumerate(thumbs):
        im = Image.open(io.BytesIO(b)).convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=60)
        small.append(buf.getvalue())
        tiny[i] = np.asarray(im.resize((MOSAIC_PX, MOSAIC_PX)))
    diag = np.asarray(ss["diagnosis"])
    by_diag = {d: np.flatnonzero(diag[t["slide"]] == d) for d in np.unique(diag)}
    per = max(1, n_tiles // n_slides)
    gx, gy = GRID
    tile_px = int(attrs.get("config", {}).get("tile_px", 224))
    attrs["config"] = {**attrs.get("config", {}), "bench": f"resampled from {source.name} with noise"}
    attrs["command_line"] = f"bench/dashboard.py --tiles {n_tiles} --slides {n_slides} (synthetic)"
    kmeans, proj = [], []
    t0 = time.time()
    with AtlasWriter(out, attrs=attrs, embedding_dim=8, output_names=names, k=k, has_probs=True) as w:
        for s in range(n_slides):
            ref = int(rng.integers(len(diag)))
            pool = by_diag[diag[ref]]
            rows = pool[rng.integers(len(pool), size=per)]
            wts = t["weights"][rows] * rng.lognormal(0, 0.25, size=(per, k)).astype(np.float32)
            logits = t["outputs"][rows] + rng.normal(0, 0.4, size=(per, len(names))).astype(np.float32)
            pos = np.arange(per)
            x = (pos % gx) * tile_px
            y = (pos // gx) * tile_px
            kmeans.append(t["kmeans_cluster"][rows])
            proj.append(t["proj"][rows] + rng.normal(0, 0.35, size=(per, 2)).astype(np.float32))
            tiles = {"x": x, "y": y, "tissue_frac": t["tissue_frac"][rows], "embedding": np.zeros((per, 8), np.float16),
                     "outputs": logits, "probs": _softmax(logits), "weights": wts, "nmf_cluster": wts.argmax(axis=1),
                     "recon_err": t["recon_err"][rows], "thumb_jpeg": [small[r] for r in rows]}
            rows_y = int(np.ceil(per / gx))
            mosaic = np.zeros((rows_y * MOSAIC_PX, gx * MOSAIC_PX, 3), np.uint8)
            mosaic[:] = 235
            hard = np.zeros((rows_y * CELLS, gx * CELLS), np.uint8)
            soft = np.zeros((k, rows_y * CELLS, gx * CELLS), np.float16)
            for p_, r in enumerate(rows):
                cx, cy = p_ % gx, p_ // gx
                mosaic[cy * MOSAIC_PX:(cy + 1) * MOSAIC_PX, cx * MOSAIC_PX:(cx + 1) * MOSAIC_PX] = tiny[r]
                hard[cy * CELLS:(cy + 1) * CELLS, cx * CELLS:(cx + 1) * CELLS] = tiles["nmf_cluster"][p_] + 1
                soft[:, cy * CELLS:(cy + 1) * CELLS, cx * CELLS:(cx + 1) * CELLS] = (wts[p_] / CELLS**2)[:, None, None]
            row = {"slide_id": f"bench-{s:05d}", "path": f"synthetic/{s}", "diagnosis": diag[ref],
                   "patient": f"p{s // 4:04d}", "status": "ok", "mpp": 0.5, "mpp_source": "cli",
                   "width": gx * tile_px, "height": rows_y * tile_px, "tile_l0": tile_px, "cell_l0": tile_px / CELLS}
            meta = {k_.removeprefix("meta."): str(ss[k_][ref]) for k_ in ss if k_.startswith("meta.")}
            w.add_slide(row, meta=meta, tiles=tiles,
                        maps={"thumbnail": mosaic, "tissue": mosaic.mean(axis=2) < 230, "hard": hard, "soft": soft},
                        map_attrs={"thumb_downsample": tile_px / MOSAIC_PX, "mask_downsample": tile_px / MOSAIC_PX,
                                   "cell_l0": tile_px / CELLS, "warnings": []})
            if s % 200 == 0:
                print(f"  slide {s}/{n_slides} ({time.time() - t0:.0f} s)", flush=True)
        w.put_tile_column("kmeans_cluster", np.concatenate(kmeans), attrs={"k": k})
        w.put_tile_column("proj", np.concatenate(proj), attrs={"method": "pca (resampled)"})
        # H keeps as many channels as the stored embeddings (the atlas validator checks they match); the
        # dashboard reads the stored distances, never H
        w.put_group("clusters", {"H": clusters["H"][:, :8], **{n: clusters[n] for n in ("distances", "cosine_similarity")}},
                    attrs=cattrs)
        pr = {n: protos[n] for n in ("slide", "tile", "cluster", "weight", "cell_y", "cell_x")}
        pr["tile"] = pr["slide"].astype(np.int64) * per  # first tile of the same-index synthetic slide
        pr["jpeg"] = crops
        w.put_group("clusters/prototypes", pr)
    print(f"built {out} ({out.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.0f} s", flush=True)
    return out


# -- measuring in the browser ---------------------------------------------------------------
def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _idle(page, timeout: float = 60_000) -> None:
    """Wait until the script is not running and every image has loaded, then two animation frames
    (the charts are drawn)."""
    idle(page, timeout)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _timed(page, action, done_selector: str) -> float:
    t0 = time.perf_counter()
    t0 = action() or t0  # an action may return the moment of its triggering click
    if done_selector.startswith("url:"):  # the view's query parameter shows the new state
        page.wait_for_url(f"**{done_selector[4:]}*", timeout=60_000)
    else:
        page.wait_for_selector(done_selector, timeout=60_000)
    _idle(page)
    return time.perf_counter() - t0


def measure(atlas: Path, repeats: int = 3, points: int | None = None) -> dict:
    with dashboard_server(atlas) as srv, chromium() as browser:
        url = srv["url"]
        res: dict = {"server_start_s": round(srv["start_s"], 3), "interactions": {}}
        context = browser.new_context(viewport={"width": 1920, "height": 1080})  # one HTTP cache
        for label in ("first_render_cold_s", "first_render_warm_s"):
            # cold: server reads the atlas, browser fetches Streamlit's scripts; warm: both cached
            page = context.new_page()
            t0 = time.perf_counter()
            page.goto(url + "/?page=overview" + (f"&points={points}" if points else ""))
            page.wait_for_selector(SCATTER, timeout=120_000)
            _idle(page, 120_000)
            res[label] = time.perf_counter() - t0
            if label.endswith("cold_s"):
                page.close()
        res["first_render_other_pages_s"] = _page_loads(context, url)
        for name, (action, done) in _interactions(page).items():
            try:
                times = [_timed(page, action, done) for _ in range(repeats if name.startswith("brush") else 1)]
            except Exception:
                page.screenshot(path=str(ROOT / "bench" / "out" / f"dashboard-failed-{name}.png"))
                raise
            res["interactions"][name] = round(min(times), 3)
        res["server_peak_rss_mb"] = round(_peak_rss_mb(srv["pid"]), 1)
        return res


PAGES = {"cluster": "text=Concept drill-down", "slides": "text=Soft map of every concept, and the model output",
         "enrichment": "text=Open a concept to see its slides:", "fidelity": "text=How to read this page"}


def _page_loads(context, url: str) -> dict:
    """First render of each other page in a new tab (the server has read the atlas; the page's own caches
    are cold): what a link to that page costs."""
    out = {}
    for name, done in PAGES.items():
        page = context.new_page()
        t0 = time.perf_counter()
        page.goto(f"{url}/?page={name}")
        page.wait_for_selector(done, timeout=120_000)
        _idle(page, 120_000)
        out[name] = round(time.perf_counter() - t0, 3)
        page.close()
    return out


def _url_change(page, action, name: str):
    """An action done when the URL's parameter `name` differs from before (then the script idles)."""
    get = f"() => new URLSearchParams(location.search).get({name!r})"
    def act():
        old = page.evaluate(get)
        t0 = action() or time.perf_counter()
        page.wait_for_function(f"() => ({get})() !== {json.dumps(old)}", timeout=60_000)
        return t0
    return act


def _view_change(page, action):
    """An action on the slide viewer; done when the URL's view= differs from before."""
    def act():
        old = page.evaluate("() => (location.search.match(/view=([^&]*)/) || [])[1] || ''")
        t0 = action() or time.perf_counter()
        page.wait_for_function(f"() => (location.search.match(/view=([^&]*)/) || [])[1] !== {old!r}",
                               timeout=60_000)
        return t0
    return act


def _interactions(page) -> dict:
    """name -> (action, selector that shows its result). Run in this order on one page."""
    def brush():
        chart = page.locator('[data-testid="stVegaLiteChart"]').first
        chart.scroll_into_view_if_needed()
        box = chart.bounding_box()
        x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
        page.mouse.move(x0, y0)
        page.mouse.down()
        page.mouse.move(x0 + box["width"] * 0.12, y0 + box["height"] * 0.15, steps=6)
        t0 = time.perf_counter()  # the gesture is the user's; the app's time starts when it ends
        page.mouse.up()
        return t0

    def select(label: str, option: str):
        def act():
            box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first
            return _choose(page, box, page.get_by_role("option", name=option, exact=True))
        return act

    def radio(name: str):
        return lambda: page.locator('[data-testid="stSidebar"]').get_by_text(name, exact=True).click()

    def click_tile():
        # a locator click scrolls the chart into view and retries if a rerun replaced the element meanwhile
        chart = page.locator('[data-testid="stVegaLiteChart"]').first
        for _ in range(5):  # a rerun can replace the chart between the wait and the box
            chart.wait_for(state="visible")
            box = chart.bounding_box()
            if box:
                break
        chart.click(position={"x": box["width"] * 0.55, "y": box["height"] * 0.45})

    def expand(label: str):
        def act():
            t = page.get_by_text(label, exact=True)
            t.scroll_into_view_if_needed()
            t0 = time.perf_counter()
            t.click()
            return t0
        return act

    def tab(label: str):
        return lambda: page.get_by_role("tab", name=label, exact=True).click()

    def button(label: str):
        def act():
            b = page.get_by_role("button", name=label, exact=True)
            b.scroll_into_view_if_needed()
            t0 = time.perf_counter()
            b.click()
            return t0
        return act

    def drag_box():
        chart = page.locator('[data-testid="stVegaLiteChart"]').first
        box = chart.bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx - 60, cy - 45)
        page.mouse.down()
        page.mouse.move(cx + 60, cy + 45, steps=6)
        t0 = time.perf_counter()
        page.mouse.up()
        return t0

    viewer = "text=1 screen px ="
    return {
        "brush_select_and_gallery": (brush, "text=Selection:"),
        "colour_by_diagnosis": (select("Colour by", "Diagnosis"), "url:color=diagnosis"),
        "open_concepts_tab": (tab("Concepts"), "url:tab=concepts"),
        "open_cluster_page": (radio("Cluster"), "text=Concept drill-down"),
        "change_concept": (select("Concept", "C3"), "text=Tiles where C3 dominates"),
        "cluster_composition_tab": (tab("Composition and outputs"), "url:tab=composition"),
        "cluster_slides_tab": (tab("Slides and distances"), "url:tab=slides"),
        "open_slides_page": (radio("Slides"), "text=Soft map of every concept, and the model output"),
        # the page's text is on screen before and after: done when the URL names another slide
        "open_other_slide": (_url_change(page, _pick_second_slide(page), "slide"),
                             "text=Soft map of every concept, and the model output"),
        "click_tile": (click_tile, "text=Top outputs:"),
        "viewer_zoom_in": (_view_change(page, button("Zoom in")), viewer),
        "viewer_drag_box_zoom": (_view_change(page, drag_box), viewer),
        "viewer_full_resolution": (_view_change(page, button("Full resolution")), viewer),
        "viewer_pan": (_view_change(page, button("→")), viewer),
        "viewer_whole_slide": (_view_change(page, button("Whole slide")), viewer),
        # the strip of small soft maps is drawn when its expander opens; done when its PNG download is there
        "show_soft_maps": (expand("Soft map of every concept, and the model output"), "[class*='st-key-dl_strip']"),
        "open_enrichment_page": (radio("Diagnosis enrichment"), "text=Open a concept to see its slides:"),
        "back_to_overview": (radio("Overview"), "text=Density image:"),
    }


def _pick_second_slide(page):
    return lambda: _choose(page, page.locator('[data-testid="stSelectbox"]').first, page.get_by_role("option").nth(1))


def _choose(page, box, option) -> float:
    """Open a selectbox and click an option (the first click can land while the element re-renders);
    returns the time of the option click, where the interaction starts."""
    for _ in range(5):
        box.click()
        try:
            option.wait_for(timeout=2_000)
            t0 = time.perf_counter()
            option.click()
            return t0
        except Exception:
            page.keyboard.press("Escape")
    raise RuntimeError("could not open the selectbox")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("/tmp/atlases/breakhis.h5"))
    ap.add_argument("--tiles", type=int, default=1_000_000)
    ap.add_argument("--slides", type=int, default=2_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    # the app draws its default for a count it does not offer: only its choices measure what they say
    ap.add_argument("--points", type=int, default=None, choices=POINT_CHOICES,
                    help=f"points drawn on the scatter (app default: {DEFAULT_POINTS:,})")
    ap.add_argument("--atlas", type=Path, default=None,
                    help="measure this existing atlas instead of building one (e.g. the small source as a baseline)")
    args = ap.parse_args()
    out = args.atlas or args.out or ROOT / "bench" / "out" / f"dashboard-{args.tiles}.h5"
    if not out.exists():
        if not args.source.exists():
            sys.exit(f"{args.source} not found: build a small atlas first (see docs/dashboard.md) or pass --source")
        build(args.source, out, args.tiles, args.slides)
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} not found (apt-get install chromium)")
    res = measure(out, args.repeats, args.points)
    res["points"] = args.points or f"app default ({DEFAULT_POINTS:,})"
    with Atlas(out) as a:
        res.update(atlas=str(out), tiles=a.n_tiles, slides=a.n_slides, size_gb=round(out.stat().st_size / 1e9, 2))
    res["machine"] = (f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, "
                      f"Python {platform.python_version()}")
    for key in ("first_render_cold_s", "first_render_warm_s"):
        res[key] = round(res[key], 2)
    print(json.dumps(res, indent=2))
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.points}pts" if args.points else ""
    (ROOT / "bench" / "out" / f"dashboard-{out.stem}{suffix}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
