"""The dashboard in a real browser: `streamlit run` on the small real atlas, driven by Playwright in
Debian's Chromium (headless, no sandbox). Each test saves screenshots under test-artifacts/ and fails
on any exception box shown in the page or any script error in the browser.

Skips (with the reason) when /usr/bin/chromium or the playwright package is missing; CI installs both.
"""

from __future__ import annotations

import json
import re
import socket

import pytest

from browser_harness import ARTIFACTS, chromium, dashboard_server, expect, missing_browser
from browser_harness import idle as harness_idle
from dashboard import ui
from precompute.colors import concept_colors, diagnosis_colors
from precompute.store import Atlas
from dashboard_fixtures import dash_atlas  # noqa: F401  (dash_atlas is a fixture)

pytestmark = pytest.mark.browser

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(dash_atlas):
    """`streamlit run dashboard/app.py -- --atlas ATLAS` as documented; yields its URL."""
    why = missing_browser()
    if why:
        pytest.skip(why)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with dashboard_server(dash_atlas, log=ARTIFACTS / "streamlit-server.log") as srv:
            yield srv
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def browser(server):
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, request):
    """A fresh page (1600 x 1000) that records script errors; screenshot and checks at the end."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    yield pg
    ARTIFACTS.mkdir(exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}-final.png"), full_page=True)
    context.close()


def idle(pg) -> None:
    """Wait until the script has finished and nothing is still loading."""
    harness_idle(pg, TIMEOUT_MS)


def check(pg, shot: str) -> None:
    """No exception box in the page, no script error in the browser; save a screenshot."""
    idle(pg)
    pg.screenshot(path=str(ARTIFACTS / f"{shot}.png"))
    boxes = pg.locator('[data-testid="stException"]')
    assert boxes.count() == 0, boxes.first.inner_text()
    assert not pg.errors, pg.errors


def open_view(pg, server, query: str = "") -> None:
    pg.goto(f"{server['url']}/{query}")
    pg.wait_for_selector('[data-testid="stSidebar"]', timeout=TIMEOUT_MS)
    idle(pg)


def choose(pg, label: str, option: str) -> None:
    """Pick `option` in the selectbox labelled `label`."""
    box = pg.locator('[data-testid="stSelectbox"]').filter(has_text=label).first
    box.scroll_into_view_if_needed()
    for _ in range(5):  # the first click can land while the element re-renders
        box.click()
        opt = pg.get_by_role("option", name=option, exact=True)
        try:
            opt.wait_for(timeout=3_000)
            opt.click()
        except Exception:  # the list did not open (the box re-rendered under the click): try again
            pg.keyboard.press("Escape")
            continue
        # the rerun the pick starts may not have begun yet: wait for the box to show it, then for idle
        expect(pg.get_by_role("combobox", name=label).first).to_have_value(option, timeout=TIMEOUT_MS)
        idle(pg)
        return
    raise AssertionError(f"could not choose {option!r} in {label!r}")


def selected(pg, label: str) -> str:
    """The value shown by the selectbox labelled `label`."""
    return pg.get_by_role("combobox", name=label).first.input_value()


def param(pg, name: str) -> list[str]:
    return re.findall(rf"[?&]{name}=([^&]*)", pg.url)


# -- tests ----------------------------------------------------------------------------------------
def test_overview_brush_selects_tiles_and_shows_gallery(page, server):
    open_view(page, server, "?page=overview")
    assert page.get_by_text("All tiles", exact=True).is_visible()
    check(page, "overview")
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    chart.scroll_into_view_if_needed()
    box = chart.bounding_box()
    x0, y0 = box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.2  # inside the plot area
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.8, steps=12)
    page.mouse.up()
    page.wait_for_selector("text=/Selection: [0-9,]+ tiles/", timeout=TIMEOUT_MS)
    idle(page)
    n = int(re.search(r"Selection: ([0-9,]+) tiles", page.content()).group(1).replace(",", ""))
    assert n > 0
    # the gallery is one chart of images: wait until Vega has drawn them, then count
    images = '[class*="st-key-gallery_gal_sel_"] svg image'
    want = min(n, ui.GALLERY_MAX)
    page.wait_for_function(f"() => document.querySelectorAll({images!r}).length >= {want}", timeout=TIMEOUT_MS)
    assert page.locator(images).count() == want
    check(page, "overview-brush-gallery")


def test_select_a_cluster(page, server):
    open_view(page, server, "?page=overview&tab=concepts")
    bars = page.locator('[data-testid="stVegaLiteChart"]').filter(has_text="click a bar to open the concept")
    bar = bars.locator('path[aria-label*="concept: C3"]').first
    bar.scroll_into_view_if_needed()
    bar.click()  # the "Tiles per dominant concept" bar of C3 opens its drill-down
    page.wait_for_selector("text=Concept drill-down", timeout=TIMEOUT_MS)
    idle(page)
    assert param(page, "page") == ["cluster"] and param(page, "cluster") == ["3"]
    assert page.get_by_text("Tiles where C3 dominates").is_visible()
    check(page, "cluster-C3")
    choose(page, "Concept", "C2")
    page.wait_for_selector("text=Tiles where C2 dominates", timeout=TIMEOUT_MS)
    assert param(page, "cluster") == ["2"]
    page.get_by_role("tab", name="Slides and distances").click()  # only the open tab is drawn
    page.get_by_text("Prevalence per slide").wait_for(timeout=TIMEOUT_MS)
    page.wait_for_url(re.compile(r"[?&]tab=slides(&|$)"), timeout=TIMEOUT_MS)
    idle(page)
    page.get_by_text("Prevalence per slide").scroll_into_view_if_needed()
    check(page, "cluster-C2")
    prevalence = page.locator('[data-testid="stVegaLiteChart"]').filter(has_text="click a bar to open the slide")
    bar = prevalence.locator('path[aria-label*="slide_id: "]').first
    slide_id = re.search(r"slide_id: ([^;]+)", bar.get_attribute("aria-label")).group(1)
    bar.click()  # a slide's prevalence bar opens that slide
    page.wait_for_selector("text=Soft map of every concept", timeout=TIMEOUT_MS)
    idle(page)
    assert param(page, "page") == ["slides"] and param(page, "slide") == [slide_id]
    check(page, "cluster-C2-opened-slide")


def test_open_a_slide_and_click_a_tile(page, server):
    open_view(page, server, "?page=slides")
    choose(page, "Slide", "cmu — squamous")
    page.wait_for_url(re.compile(r"[?&]slide=cmu(&|$)"), timeout=TIMEOUT_MS)  # the pick's rerun wrote it
    idle(page)
    assert param(page, "slide") == ["cmu"]
    check(page, "slide-cmu")
    before = param(page, "tile")
    tile = page.locator('[data-testid="stVegaLiteChart"]').first.locator('path[aria-label*="concept: C"]').nth(20)
    tile.click()
    page.wait_for_function(f"() => {{ const t = new URLSearchParams(location.search).get('tile');"
                           f" return t !== null && t !== {(before[0] if before else '')!r}; }}", timeout=TIMEOUT_MS)
    idle(page)
    assert param(page, "tile") != before
    assert page.get_by_text("Top outputs:").is_visible()
    check(page, "slide-cmu-tile")
    choose(page, "Layer", "Soft map of one concept")
    page.wait_for_url(re.compile(r"[?&]layer=soft(&|$)"), timeout=TIMEOUT_MS)  # each pick's rerun wrote it
    choose(page, "Concept", "C2")
    page.wait_for_url(re.compile(r"[?&]soft=2(&|$)"), timeout=TIMEOUT_MS)
    idle(page)
    check(page, "slide-cmu-soft-C2")
    choose(page, "Layer", "Model output")
    page.wait_for_url(re.compile(r"[?&]layer=output(&|$)"), timeout=TIMEOUT_MS)
    idle(page)
    assert param(page, "layer") == ["output"]
    check(page, "slide-cmu-output")
    open_view(page, server, "?page=slides&slide=broken")
    assert page.get_by_text("This slide failed during the run").is_visible()
    check(page, "slide-broken")


SCATTER = '[data-testid="stVegaLiteChart"]'
POINT_FILLS = f"() => [...document.querySelector({SCATTER!r}).querySelectorAll('g.mark-symbol path')].map(p => p.getAttribute('fill'))"


def test_overview_recolours_the_same_chart_and_serves_its_density_image(page, server, dash_atlas):
    with Atlas(dash_atlas) as a:
        diagnoses, k = sorted(set(a.slides()["diagnosis"])), a.k
    open_view(page, server, "?page=overview")
    chart = page.locator(SCATTER).first
    image = chart.locator("svg g.mark-image image").first
    image.wait_for(state="attached", timeout=TIMEOUT_MS)
    href = image.evaluate("el => el.getAttribute('href') || el.getAttribute('xlink:href')")
    # a short link to this server (Vega resolves it), no base64 in the chart
    assert re.fullmatch(re.escape(server["url"]) + r"/media/[0-9a-f]+\.png", href), href
    got = page.request.get(href)
    assert got.ok and got.body()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(page.evaluate(POINT_FILLS)) <= {c.lower() for c in concept_colors(k)}
    chart.locator("svg").first.evaluate("el => { el.dataset.before = 'yes'; }")
    choose(page, "Colour by", "Diagnosis")
    page.wait_for_url(re.compile(r"[?&]color=diagnosis"), timeout=TIMEOUT_MS)
    want = sorted({c.lower() for c in diagnosis_colors(diagnoses)})
    # every point turns to its diagnosis's colour in place: the browser kept the chart and swapped its data
    page.wait_for_function(f"() => {{ const f = new Set(({POINT_FILLS})()); "
                           f"return f.size > 0 && [...f].every(c => {json.dumps(want)}.includes(c)); }}",
                           timeout=TIMEOUT_MS)
    assert chart.locator("svg").first.get_attribute("data-before") == "yes"
    legend = page.locator('[data-testid="stMarkdownContainer"]', has=page.locator("b", has_text="diagnosis"))
    for d in diagnoses:
        expect(legend.first).to_contain_text(d)  # the legend above the chart
    check(page, "overview-colour-by-diagnosis")


def test_permalink_reopens_the_same_view(page, browser, server):
    open_view(page, server, "?page=overview")
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.locator('[data-testid="stMultiSelect"]').click()
    page.get_by_role("option", name="malignant", exact=True).click()
    page.keyboard.press("Escape")
    page.wait_for_url(re.compile(r"[?&]dx=malignant"), timeout=TIMEOUT_MS)  # the filter reached the URL
    idle(page)
    choose(page, "Colour by", "Diagnosis")
    page.wait_for_url(re.compile(r"[?&]color=diagnosis"), timeout=TIMEOUT_MS)
    sidebar.get_by_text("Cluster", exact=True).click()
    page.wait_for_selector("text=Concept drill-down", timeout=TIMEOUT_MS)
    idle(page)
    choose(page, "Concept", "C4")
    page.wait_for_url(re.compile(r"[?&]cluster=4"), timeout=TIMEOUT_MS)
    idle(page)
    page.get_by_role("tab", name="Composition and outputs").click()
    page.wait_for_url(re.compile(r"[?&]tab=composition(&|$)"), timeout=TIMEOUT_MS)
    page.get_by_text("Model outputs on its tiles").wait_for(timeout=TIMEOUT_MS)
    idle(page)
    link = page.url
    assert param(page, "dx") == ["malignant"] and param(page, "cluster") == ["4"]
    check(page, "permalink-source")
    other = browser.new_context(viewport={"width": 1600, "height": 1000}).new_page()
    other.errors = []
    other.on("pageerror", lambda exc: other.errors.append(str(exc)))
    other.goto(link)
    other.wait_for_selector("text=Tiles where C4 dominates", timeout=TIMEOUT_MS)
    idle(other)
    side = other.locator('[data-testid="stSidebar"]')
    expect(side.get_by_role("radio", name="Cluster")).to_be_checked(timeout=TIMEOUT_MS)
    expect(side.get_by_text("malignant")).to_be_visible(timeout=TIMEOUT_MS)
    assert selected(other, "Concept") == "C4"
    expect(other.get_by_role("tab", name="Composition and outputs")).to_have_attribute("aria-selected", "true")
    expect(other.get_by_text("Model outputs on its tiles")).to_be_visible(timeout=TIMEOUT_MS)
    check(other, "permalink-reopened")
    side.get_by_text("Overview", exact=True).click()  # the colouring came with the link too
    other.get_by_text("All tiles", exact=True).wait_for(timeout=TIMEOUT_MS)
    idle(other)
    assert selected(other, "Colour by") == "Diagnosis"
    check(other, "permalink-overview")
    other.context.close()


def test_enrichment_page(page, server):
    open_view(page, server, "?page=enrichment&target=malignant")
    assert page.get_by_text("log2 enrichment in malignant").first.is_visible()
    check(page, "enrichment")


def _outward_address() -> str | None:
    """This machine's address on its default route (a UDP 'connect' sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return None


def test_server_listens_on_localhost_only(server):
    addr = _outward_address()
    if not addr or addr.startswith("127."):
        pytest.skip("this machine has no non-loopback address to try")
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((addr, server["port"])) != 0, f"the dashboard answers on {addr}"
