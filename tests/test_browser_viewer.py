"""The slide viewer and click-through in a real browser (Chromium through Playwright, harness of
test_browser_dashboard.py) on the small real atlas: zoom into CMU-1-Small-Region to full resolution
and compare what is on screen with the slide's own pixels there, and the concept map with the atlas's
hard map; open a prototype's tile from the Cluster page, outlined; move the outline by a click and a
list pick; a link from another atlas; every page at 1280x720 and 1920x1080 (test-artifacts/).

Every wait is for a state of the page (URL, script idle, image drawn), never for a time. The time a
view change takes is written to test-artifacts/viewer-timings.json (a figure, not a pass mark).
"""

from __future__ import annotations

import io
import json
import time
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from dashboard import viewport as vp
from dashboard.views import slide
from precompute.colors import concept_lut
from dashboard.links import fingerprint
from browser_harness import dashboard_server, expect
from dashboard_fixtures import DATA, dash_atlas  # noqa: F401  (dash_atlas is a fixture)
from precompute.store import Atlas
from synthetic_atlas import write_atlas
from test_browser_dashboard import (ARTIFACTS, TIMEOUT_MS, browser, check, choose, idle, open_view,  # noqa: F401
                                    page, param, server)

pytestmark = pytest.mark.browser
CMU = DATA / "slides" / "CMU-1-Small-Region.svs"
PLOT = '[data-testid="stVegaLiteChart"] svg.marks'
IMAGE_HREF = ("() => { const i = document.querySelector('[data-testid=stVegaLiteChart] svg.marks image');"
              " return i ? i.getAttribute('href') : null; }")


@pytest.fixture(scope="module")
def atlas(dash_atlas):
    with Atlas(dash_atlas) as a:
        s = a.slides()
        i = list(s["slide_id"]).index("cmu")
        maps = a.slide_maps(i)
        protos = a.group("clusters/prototypes")
        t = a.tiles(["x", "y"])
        return {"index": i, "slides": s, "hard": maps["hard"], "cell": float(maps.attrs["cell_l0"]),
                "k": a.k, "protos": protos, "x": t["x"], "y": t["y"], "fp": fingerprint(a.attrs)}


def view_of(pg) -> vp.View:
    return vp.View.parse(unquote(param(pg, "view")[0]))


def plot_shot(pg) -> tuple[np.ndarray, dict]:
    """Screenshot of the viewer's plot (RGB array) and its bounding box."""
    plot = pg.locator(PLOT).first
    box = plot.bounding_box()
    return np.asarray(Image.open(io.BytesIO(plot.screenshot())).convert("RGB")), box


def image_origin(pg) -> tuple[float, float]:
    """Where Vega put the rendered image's top-left corner, in plot px (its `translate`)."""
    t = pg.evaluate("() => document.querySelector('[data-testid=stVegaLiteChart] svg.marks image')"
                    ".getAttribute('transform')")
    tx, ty = (float(v) for v in t[t.index("(") + 1:t.index(")")].split(","))
    return tx, ty


def screen_to_l0(pg, view: vp.View, u: float, v: float) -> tuple[float, float]:
    """Level-0 point under plot px (u, v): the image's corner is level-0 view.box()[:2]."""
    tx, ty = image_origin(pg)
    x0, y0, _, _ = view.box()
    return x0 + (u - tx) * view.s, y0 + (v - ty) * view.s


def wait_view_change(pg, old: str) -> None:
    # URLSearchParams decodes the value (the address bar holds 1110%2C1484%2C5.044 for 1110,1484,5.044)
    pg.wait_for_function(f"() => {{ const v = new URLSearchParams(location.search).get('view');"
                         f" return v !== null && v !== {old!r}; }}", timeout=TIMEOUT_MS)
    idle(pg)


def press(pg, label: str) -> float:
    """Click a viewer button; seconds until the new view's image is drawn and the script is idle."""
    old_view = param(pg, "view")[0]
    old_href = pg.evaluate(IMAGE_HREF)
    t = time.perf_counter()
    pg.get_by_role("button", name=label, exact=True).click()
    pg.wait_for_function(f"() => {{ const f = {IMAGE_HREF}; const h = f(); return h && h !== {old_href!r}; }}",
                         timeout=TIMEOUT_MS)
    pg.wait_for_function("() => document.querySelector('[data-testid=stApp]')"
                         ".getAttribute('data-test-script-state') === 'notRunning'", timeout=TIMEOUT_MS)
    took = time.perf_counter() - t
    wait_view_change(pg, old_view)
    return took


def test_zoom_to_full_resolution_shows_the_slide_and_aligned_overlay(page, server, atlas):
    if not CMU.exists():
        pytest.skip(f"{CMU} not found")
    import openslide

    open_view(page, server, "?page=slides&slide=cmu&layer=clusters&opacity=0")
    check(page, "viewer-cmu-whole")
    timings = {label: press(page, label) for label in ("Zoom in", "Zoom in", "Full resolution")}
    view = view_of(page)
    assert view.s == 1.0
    assert page.get_by_text("pixels from original slide via openslide (level 0").is_visible()
    check(page, "viewer-cmu-full-resolution")
    shot, box = plot_shot(page)
    h, w = shot.shape[:2]
    with openslide.OpenSlide(str(CMU)) as osr:
        x0, y0 = screen_to_l0(page, view, 0, 0)
        ref = np.asarray(osr.read_region((int(np.floor(x0)), int(np.floor(y0))), 0, (w, h)).convert("RGB"))
    # a central patch (the scale bar is top left), at the expected place and shifted by a few px
    p0, size = (h // 2 - 100, w // 2 - 100), 200
    patch = shot[p0[0]:p0[0] + size, p0[1]:p0[1] + size].astype(float)

    def mae(dy: int, dx: int) -> float:
        return float(np.abs(patch - ref[p0[0] + dy:p0[0] + dy + size, p0[1] + dx:p0[1] + dx + size]).mean())
    errors = {(dy, dx): mae(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    best = min(errors, key=errors.get)
    assert max(abs(best[0]), abs(best[1])) <= 1, errors
    assert errors[best] < 12 and errors[best] < 0.5 * mae(8, 8), (errors[best], mae(8, 8))

    # the concept map at full opacity: every fully visible cell has its concept's colour
    open_view(page, server, f"?page=slides&slide=cmu&layer=clusters&opacity=100&view={view.param()}")
    shot, box = plot_shot(page)
    lut, cell, hard = concept_lut(atlas["k"]), atlas["cell"], atlas["hard"]
    good = total = 0
    ox, oy = screen_to_l0(page, view, 0, 0)
    for v in range(40, shot.shape[0] - 8, 9):
        for u in range(8, shot.shape[1] - 8, 9):
            x, y = ox + (u + 0.5) * view.s, oy + (v + 0.5) * view.s
            i, j = int(y // cell), int(x // cell)
            near_edge = min(x % cell, cell - x % cell, y % cell, cell - y % cell) < 4 * view.s
            if not (0 <= i < hard.shape[0] and 0 <= j < hard.shape[1]) or hard[i, j] == 0 or near_edge:
                continue
            total += 1
            good += int(np.abs(shot[v, u].astype(int) - lut[hard[i, j], :3].astype(int)).sum() <= 40)
    assert total > 100 and good >= 0.95 * total, (good, total)
    check(page, "viewer-cmu-full-resolution-concepts")
    timings["Zoom out"] = press(page, "Zoom out")
    timings["→"] = press(page, "→")
    timings["Whole slide"] = press(page, "Whole slide")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "viewer-timings.json").write_text(json.dumps(
        {"what": "seconds from a viewer button click to the new view drawn and the script idle, CMU-1-Small-Region, "
                 "1600x1000 Chromium", "timings": timings}, indent=1))


def test_drag_a_box_zooms_into_it(page, server):
    open_view(page, server, "?page=slides&slide=cmu")
    before = view_of(page)
    _, box = plot_shot(page)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 40, cy - 30)
    page.mouse.down()
    page.mouse.move(cx + 40, cy + 30, steps=10)
    page.mouse.up()
    wait_view_change(page, before.param())
    after = view_of(page)
    assert after.s < before.s / 3  # an 80-px box fills the chart
    x, y = screen_to_l0(page, before, box["width"] / 2, box["height"] / 2)
    assert abs(after.cx - x) < 40 * before.s and abs(after.cy - y) < 40 * before.s
    check(page, "viewer-drag-zoom")


def outline_box(pg) -> dict:
    """Screen box of the black outline drawn into the view image (found in a screenshot)."""
    shot, _ = plot_shot(pg)
    plot = pg.locator(PLOT).first.bounding_box()
    black = (shot.max(axis=2) < 30)
    black[-70:] = False  # the scale bar and its label (bottom centre)
    rows, cols = black.sum(axis=1), black.sum(axis=0)  # the outline's sides are the longest black runs
    ys, xs = np.flatnonzero(rows >= rows.max() * 0.8), np.flatnonzero(cols >= cols.max() * 0.8)
    return {"x": plot["x"] + xs.min(), "y": plot["y"] + ys.min(), "width": xs.max() - xs.min() + 1,
            "height": ys.max() - ys.min() + 1}


def expected_box(pg, atlas, row: int) -> dict:
    """Screen box where tile `row` should be outlined, from the URL's view."""
    view = view_of(pg)
    plot = pg.locator(PLOT).first.bounding_box()
    t = float(atlas["slides"]["tile_l0"][atlas["index"]])
    ox, oy = screen_to_l0(pg, view, 0, 0)
    u, v = (atlas["x"][row] - ox) / view.s, (atlas["y"][row] - oy) / view.s
    return {"x": plot["x"] + u, "y": plot["y"] + v, "width": t / view.s, "height": t / view.s}


def assert_outlined(pg, atlas, row: int) -> None:
    """The outline's centre is on the tile's centre and its size is the tile's (plus the stroke)."""
    got, want = outline_box(pg), expected_box(pg, atlas, row)
    for a, b in (("x", "width"), ("y", "height")):
        assert abs(got[a] + got[b] / 2 - want[a] - want[b] / 2) <= 3, (a, got, want)
        assert want[b] - 2 <= got[b] <= want[b] + 14, (b, got, want)


def click_gallery_tile(pg, key: str, n: int) -> None:
    """Click image n of the gallery `key` (one chart of images: a click on an image opens its tile)."""
    img = pg.locator(f'[class*="st-key-gallery_{key}_"] svg image').nth(n)
    img.scroll_into_view_if_needed()
    box = img.bounding_box()
    pg.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def test_prototype_opens_its_tile_outlined_and_the_outline_follows_picks(page, server, atlas):
    """A prototype on the CMU slide (the concept page shows each concept's top 16 by weight)."""
    p = atlas["protos"]
    k, n = next((k, n) for k in range(atlas["k"])
                for n, r in enumerate([r for r in np.argsort(-p["weight"], kind="stable") if p["cluster"][r] == k][:16])
                if p["slide"][r] == atlas["index"])
    r = [r for r in np.argsort(-p["weight"], kind="stable") if p["cluster"][r] == k][n]
    want_tile, want_slide = int(p["tile"][r]), "cmu"
    open_view(page, server, f"?page=cluster&cluster={k + 1}")
    check(page, "cluster-prototypes-in-tiles")
    click_gallery_tile(page, "proto", n)
    page.wait_for_function("() => location.search.includes('page=slides')", timeout=TIMEOUT_MS)
    idle(page)
    assert param(page, "slide") == [want_slide] and param(page, "tile") == [str(want_tile)]
    assert_outlined(page, atlas, want_tile)
    check(page, "prototype-opened-outlined")

    # a click on another tile moves the outline there
    tiles = page.locator(PLOT + ' path[aria-label*="concept: "]')
    plot = page.locator(PLOT).first.bounding_box()
    inside = [b for b in (tiles.nth(j).bounding_box() for j in range(tiles.count()))
              if b and b["x"] >= plot["x"] + 10 and b["y"] >= plot["y"] + 20 and
              b["x"] + b["width"] <= plot["x"] + plot["width"] - 10 and
              b["y"] + b["height"] <= plot["y"] + plot["height"] - 80]
    target = next(b for b in inside if abs(b["x"] - outline_box(page)["x"]) > b["width"])
    page.mouse.click(target["x"] + target["width"] / 2, target["y"] + target["height"] / 2)
    page.wait_for_function(f"() => {{ const t = new URLSearchParams(location.search).get('tile');"
                           f" return t !== null && t !== '{want_tile}'; }}", timeout=TIMEOUT_MS)
    idle(page)
    clicked = int(param(page, "tile")[0])
    assert clicked != want_tile
    assert_outlined(page, atlas, clicked)
    # then a pick in the tile list moves it again (and brings the tile into view)
    start, n = int(atlas["slides"]["tile_start"][atlas["index"]]), int(atlas["slides"]["n_tiles"][atlas["index"]])
    listed = slide.window(range(start, start + n), clicked - start)  # the tiles around the clicked one
    other = max(listed[0], listed[-1], key=lambda r: abs(r - clicked))  # the farthest: likely out of view
    label = f"#{other - start} ({atlas['x'][other]}, {atlas['y'][other]})"
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text="Tile (x, y").first
    box.scroll_into_view_if_needed()
    box.click()
    page.keyboard.type(label)  # the list filters as one types; Enter picks the first match
    page.get_by_role("option").filter(has_text=label).first.wait_for(timeout=TIMEOUT_MS)
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => new URLSearchParams(location.search).get('tile') === '{other}'",
                           timeout=TIMEOUT_MS)
    idle(page)
    assert_outlined(page, atlas, other)
    check(page, "outline-after-list-pick")


def test_scatter_point_opens_its_tile_outlined(page, server, atlas, dash_atlas):
    """One click on a point of the overview scatter picks that tile; a click on its picture opens the slide
    there, outlined. The point is one of the CMU slide's (its tooltip names the slide)."""
    open_view(page, server, "?page=overview")
    point = page.locator('[data-testid="stVegaLiteChart"] svg.marks g.mark-symbol path[aria-label*="slide: cmu;"]').first
    point.scroll_into_view_if_needed()
    label = point.get_attribute("aria-label")
    box = point.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.get_by_text("Picked tile").wait_for(timeout=TIMEOUT_MS)
    idle(page)
    check(page, "scatter-point-picked")
    click_gallery_tile(page, "gal_pick", 0)
    page.wait_for_function("() => location.search.includes('page=slides')", timeout=TIMEOUT_MS)
    # the click reruns the scatter's fragment, which then reruns the whole app: wait for the slide page
    page.get_by_text("Soft map of every concept, and the model output").wait_for(timeout=TIMEOUT_MS)
    idle(page)
    row = int(param(page, "tile")[0])
    assert param(page, "slide") == ["cmu"]
    with Atlas(dash_atlas) as a:  # the opened tile is the clicked point: same projection (as the tooltip shows it)
        proj = a.tiles(["proj"])["proj"][row]
    shown = {k: float(v.replace("\u2212", "-")) for k, v in (f.split(": ") for f in label.split("; ")[:2])}
    assert abs(shown["px"] - proj[0]) < 1e-6 and abs(shown["py"] - proj[1]) < 1e-6, (shown, proj)
    assert_outlined(page, atlas, row)
    check(page, "scatter-point-opened-outlined")


def test_tile_permalink_is_outlined(page, server, atlas):
    start = int(atlas["slides"]["tile_start"][atlas["index"]])
    row = start + int(atlas["slides"]["n_tiles"][atlas["index"]]) // 2
    open_view(page, server, f"?page=slides&slide=cmu&tile={row}&atlas={atlas['fp']}")
    assert_outlined(page, atlas, row)
    check(page, "tile-permalink")


def test_link_from_another_atlas_says_so(page, server, atlas):
    page.goto(f"{server['url']}/?page=slides&slide=cmu&tile=3&atlas=00000000")
    page.get_by_text("This link was made on another atlas").wait_for(timeout=TIMEOUT_MS)
    idle(page)
    assert page.locator('[data-testid="stVegaLiteChart"]').count() == 0
    check(page, "link-from-another-atlas")
    page.get_by_role("button", name="Open this atlas's overview").click()
    page.wait_for_function(f"() => location.search.includes('atlas={atlas['fp']}')", timeout=TIMEOUT_MS)
    page.get_by_text("All tiles", exact=True).wait_for(timeout=TIMEOUT_MS)
    assert param(page, "slide") == []


@pytest.mark.parametrize("size", [(1280, 720), (1920, 1080)])
def test_every_page_at_projector_sizes(browser, server, size):
    """Each page at the size; full-page screenshots; the viewer uses the width it is given. Nothing is
    fetched from anywhere but the dashboard's server (a meeting room may be offline, and a hospital
    network should not see requests leave for outside services)."""
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    pg = context.new_page()
    pg.errors, outside = [], []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    pg.on("request", lambda r: r.url.startswith((server["url"], "data:", "blob:")) or outside.append(r.url))
    try:
        for name in ("overview", "cluster", "slides", "enrichment", "fidelity"):
            extra = "&slide=cmu" if name == "slides" else ""
            open_view(pg, server, f"?page={name}{extra}")
            check(pg, f"page-{name}-{size[0]}x{size[1]}")
            pg.screenshot(path=str(ARTIFACTS / f"page-{name}-{size[0]}x{size[1]}-full.png"), full_page=True)
            if name == "slides":
                plot = pg.locator(PLOT).first.bounding_box()
                row = pg.locator('[data-testid="stHorizontalBlock"]').first.bounding_box()  # the selectors' row
                assert plot["width"] >= row["width"] - 4  # the viewer takes the page's width
                assert plot["x"] + plot["width"] <= size[0]
                tile = pg.locator("figure img").first  # the selected tile's picture has loaded, in its 200-px box
                tile.scroll_into_view_if_needed()
                assert tile.evaluate("i => i.complete && i.naturalWidth > 0") and tile.bounding_box()["width"] >= 150
        assert not outside, outside
    finally:
        context.close()


def test_a_slide_outside_a_cut_list_is_found_by_typing_its_id(page, tmp_path):
    """A cohort with more slides than the list shows (LIST_MAX): typing the id of an unlisted slide and
    Enter opens it; a text that matches no slide leaves the open slide and says so, showing the text as typed."""
    n = slide.LIST_MAX + 30
    ids = [f"S{i:03d}" for i in range(n)]
    path = write_atlas(tmp_path / "cohort.h5", slide_ids=ids, diagnoses=["benign"] * n, tiles_per_slide=(4,) * n)
    with dashboard_server(path, log=ARTIFACTS / "streamlit-server-cohort.log") as srv:
        open_view(page, srv, "?page=slides")
        box = page.locator('[data-testid="stSelectbox"]').filter(has_text="Slide (").first
        expect(box).to_contain_text(f"{n} in the filter")
        wanted = ids[-1]  # the list shows S000..S099 around the first slide
        for text, slide_id in ((wanted, wanted), ("**no such slide**", wanted)):
            box.click()
            page.keyboard.type(text)
            page.keyboard.press("Enter")
            page.wait_for_function(f"() => new URLSearchParams(location.search).get('slide') === '{slide_id}'",
                                   timeout=TIMEOUT_MS)
            idle(page)
        notice = page.get_by_text("No slide in the filter has an id containing")
        expect(notice).to_contain_text("**no such slide**", timeout=TIMEOUT_MS)  # shown as typed, not as Markdown
        expect(box.get_by_role("combobox")).to_have_value(f"{wanted} — benign", timeout=TIMEOUT_MS)
        check(page, "slide-found-by-typing")
