"""Small shared pieces of the pages: downloads, galleries, captions, the concept colour scale."""

from __future__ import annotations

import io
import re
from typing import Callable

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image, ImageDraw

from precompute.colors import concept_colors
from precompute.images import encode_image

from . import raster
from .data import AtlasData
from .labels import concept_label
from .tile_link import open_tile

GALLERY_MAX = 24  # four rows of six: what a 1080p screen shows at once; the CSV has them all


AXIS_COLOR = "#1a1a1a"  # chart text: 17:1 on white (projector readability needs >= 4.5:1)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "lumen"


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _inert(value):
    """A text cell that a spreadsheet would run as a formula gets a leading ' (numbers stay numbers)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def csv_bytes(df: pd.DataFrame) -> bytes:
    """UTF-8 CSV of `df` for download, with formula-like text cells and headers neutralised.
    Every CSV the dashboard offers goes through here."""
    out = df.copy()
    for col in out.columns:
        if not pd.api.types.is_numeric_dtype(out[col]) and not pd.api.types.is_bool_dtype(out[col]):
            out[col] = out[col].astype(object).map(_inert)
    out.columns = [_inert(str(c)) for c in out.columns]
    # CRLF rows (RFC 4180): the csv writer then quotes any cell holding a CR or LF, so none splits a row.
    return out.to_csv(index=False, lineterminator="\r\n").encode()


def download_prefix() -> str:
    """'<atlas name>-' for download file names (set by the app for the atlas it shows)."""
    return st.session_state.get("_download_prefix", "")


def _file_name(name: str, ext: str) -> str:
    prefix = download_prefix()
    name = name if name.startswith(prefix) else prefix + name
    return f"{_slug(name)}.{ext}"


def csv_button(df: pd.DataFrame | Callable[[], pd.DataFrame], name: str, key: str, label: str = "CSV") -> None:
    """Download button for a table (built only when clicked if `df` is a callable)."""
    make = df if callable(df) else (lambda: df)
    st.download_button(f":material/download: {label}", data=lambda: csv_bytes(make()),
                       file_name=_file_name(name, "csv"), mime="text/csv", key=key, on_click="ignore")


def png_button(png: bytes | Callable[[], bytes], name: str, key: str, label: str = "PNG") -> None:
    st.download_button(f":material/download: {label}", data=png if callable(png) else (lambda: png),
                       file_name=_file_name(name, "png"), mime="image/png", key=key, on_click="ignore")


def concept_scale(k: int) -> alt.Scale:
    """Altair colour scale mapping 'C1'..'CK' to the fixed concept palette."""
    return alt.Scale(domain=[concept_label(j) for j in range(k)], range=concept_colors(k))


def tile_captions(data: AtlasData, rows) -> list[str]:
    """'slide · C3 · TUM 0.93' for each tile row."""
    ids = data.slide_ids()
    names = data.output_names
    return [f"{ids[data.tile_slide[r]]} · {concept_label(data.nmf[r])} · "
            f"{names[data.top[r]]} {data.out[r, data.top[r]]:.2f}" for r in rows]


def contact_sheet(images: list[bytes], captions: list[str], cols: int = 8, cell: int = 160) -> bytes:
    """PNG mosaic of JPEG thumbnails with a caption line under each (for gallery downloads)."""
    n = max(1, len(images))
    rows = (n + cols - 1) // cols
    cap_h = 16
    sheet = Image.new("RGB", (cols * cell, rows * (cell + cap_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (jpg, cap) in enumerate(zip(images, captions)):
        im = Image.open(io.BytesIO(jpg)).convert("RGB")
        im.thumbnail((cell - 4, cell - 4))
        x, y = (i % cols) * cell, (i // cols) * (cell + cap_h)
        sheet.paste(im, (x + 2, y + 2))
        draw.text((x + 2, y + cell), cap[:40], fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def tile_gallery(data: AtlasData, rows, name: str, key: str, width: int = 120,
                 captions: list[str] | None = None, cols: int = 6) -> None:
    """Thumbnails of `rows` (at most GALLERY_MAX) with captions; a click on one opens its slide at that
    tile. CSV and PNG downloads under them."""
    rows = np.asarray(rows, np.int64)[:GALLERY_MAX]
    if not len(rows):
        st.info("No tiles to show.")
        return
    caps = captions or tile_captions(data, rows)
    images = data.thumbnails(rows)
    image_grid(data, images, caps, rows, key, width, cols)
    with st.container(horizontal=True):
        csv_button(lambda: data.tile_table(rows), name, key=f"{key}_csv")
        png_button(lambda: contact_sheet(images, caps), name, key=f"{key}_png")


def image_grid(data: AtlasData, images: list, caps: list[str], rows, key: str, width: int, cols: int) -> None:
    """Images (JPEG/PNG bytes or RGB arrays) in a grid of `cols` columns, captions under them; a click on
    image i opens tile rows[i] on its slide.

    One chart of image marks, not an image and a button per tile: a 24-tile gallery as 48 page elements
    cost the browser about 0.5 s per rerun at 10^6 tiles, one chart about 0.1 s."""
    n = len(rows)
    rows_n = (n + cols - 1) // cols
    row_h = width + CAPTION_PX
    df = pd.DataFrame({
        "row": np.asarray(rows, np.int64), "col": np.arange(n) % cols, "top": (np.arange(n) // cols) * row_h,
        "url": [inline_image(img) for img in images], "caption": list(caps),
        # two lines under a narrow image (the slide, then the rest); each cut to the column's width
        "lines": [c.replace(" · ", "\n", 1) for c in caps],
    })
    opened = st.session_state.get("_gallery_opens", 0)
    chart_key = f"gallery_{key}_{opened}"  # a new chart after each open: no selection left over to re-click
    st.vega_lite_chart(spec={**_gallery_spec(cols, width, rows_n), "datasets": {GALLERY: df}}, width="stretch",
                       on_select=lambda: _open_picked(data, chart_key), selection_mode="open", key=chart_key)


GALLERY = "tiles"  # the gallery chart's named data set: row, col, top (px), url, caption, lines
CAPTION_PX = 48  # under each gallery image: two caption lines


@st.cache_data(max_entries=16, show_spinner=False)
def _gallery_spec(cols: int, width: int, n_rows: int) -> dict:
    """Vega-Lite spec of a gallery of `n_rows` rows of `cols` images (at most `width` px wide) over the
    data set GALLERY. Built and checked once per shape: Altair's check of it took 0.05 s per gallery on
    every rerun."""
    row_h = width + CAPTION_PX
    pick = alt.selection_point(name="open", fields=["row"], on="click", toggle=False, clear=False)
    # columns share the page's width (images shrink to fit a narrow column); rows are placed in pixels
    x = alt.X("col:O", axis=None, scale=alt.Scale(domain=list(range(cols)), paddingInner=0, paddingOuter=0))
    base = alt.Chart(alt.Data(name=GALLERY)).encode(x=x)
    size = alt.expr(f"min({width}, bandwidth('x') - 8)")
    tip = [alt.Tooltip("caption:N", title="tile"), alt.Tooltip("action:N", title="click")]
    pictures = base.transform_calculate(action="'open on its slide'").mark_image(
        width=size, height=size, align="center", baseline="top", cursor="pointer",
    ).encode(y=alt.Y("top:Q", scale=None, axis=None), url="url:N", tooltip=tip,
             description="caption:N").add_params(pick)
    labels = base.mark_text(
        baseline="top", fontSize=15, color=AXIS_COLOR, lineBreak="\n", limit=alt.expr("bandwidth('x') - 6"),
        yOffset=alt.expr(f"min({width}, bandwidth('x') - 8) + 4"),
    ).encode(y=alt.Y("top:Q", scale=None, axis=None), text="lines:N")
    return alt.layer(pictures, labels).properties(height=n_rows * row_h).configure_view(stroke=None).to_dict()


def _open_picked(data: AtlasData, chart_key: str) -> None:
    """on_select of a gallery: open the clicked tile (a row number the browser sent back: checked)."""
    picked = (st.session_state.get(chart_key) or {}).get("selection", {}).get("open") or []
    try:
        row = int(picked[0]["row"])
    except (IndexError, KeyError, TypeError, ValueError):
        return
    if 0 <= row < data.n:
        st.session_state["_gallery_opens"] = st.session_state.get("_gallery_opens", 0) + 1
        open_tile(data, row)


def media_url(content: bytes, mime: str, slot: str) -> str:
    """A short link ('/media/<hash>.png') under which the server hands `content` to this browser session
    while each run registers it again at `slot` (one name per place on the page: a new file at the same
    slot replaces the old one, so files do not pile up). A data URL where no Streamlit server runs."""
    from streamlit import runtime

    if not runtime.exists():
        return raster.data_url(content, mime)
    url = runtime.get_instance().media_file_mgr.add(content, mime, slot)
    base = (st.get_option("server.baseUrlPath") or "").strip("/")
    return f"/{base}{url}" if base else url


def inline_image(img) -> str:
    """A data URL of a JPEG/PNG (bytes) or an RGB array (H, W, 3): the image arrives inside the page update
    instead of as one more request after it (a 24-tile gallery loaded 0.35 s after the script finished)."""
    if isinstance(img, np.ndarray):
        img = encode_image(img, "JPEG", quality=90)
    return raster.data_url(img, "image/png" if img[:4] == b"\x89PNG" else "image/jpeg")


def rows_height(n: int, per: int = 40, extra: int = 100) -> int:
    """Total chart height (Streamlit sizes title + axes + plot to it) for n bands of a discrete axis."""
    return per * max(n, 1) + extra


def styled(ch: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """The app's chart style: type large and dark enough for a projector."""
    return ch.configure_axis(labelFontSize=16, titleFontSize=16, labelColor=AXIS_COLOR, titleColor=AXIS_COLOR,
                             labelLimit=320).configure_legend(
        labelFontSize=16, titleFontSize=16, labelColor=AXIS_COLOR, titleColor=AXIS_COLOR, symbolSize=160,
        labelLimit=320).configure_title(fontSize=17, anchor="start", color=AXIS_COLOR, limit=0)


EXPORT_WIDTH = 900  # px of a chart's plot area in its PNG download (the page's charts stretch to the screen)


def chart_title(ch: alt.TopLevelMixin) -> str:
    """The chart's title text (layers: the first titled layer), '' when it has none."""
    for part in [ch, *getattr(ch, "layer", [])]:
        title = getattr(part, "title", alt.Undefined)
        text = getattr(title, "text", title)
        if isinstance(text, str) and text:
            return text
    return ""


def chart_png(ch: alt.TopLevelMixin) -> bytes:
    """PNG (2x scale) of a chart with its legend, drawn on the server by vl-convert (no browser, offline)."""
    return spec_png(styled(ch).to_dict())


def spec_png(spec: dict) -> bytes:
    """PNG (2x scale) of a styled Vega-Lite spec whose data sets are inline values."""
    import vl_convert as vlc  # lazy: its engine starts on the first export (~1-3 s), never at page load

    if "width" not in spec and not {"hconcat", "vconcat", "concat", "facet", "repeat"} & spec.keys():
        spec["width"] = EXPORT_WIDTH
    return vlc.vegalite_to_png(spec, scale=2)


def chart(ch: alt.TopLevelMixin, *, name: str | None = None, **kwargs):
    """st.altair_chart with the app's defaults (full width, type large enough for a projector), and a
    PNG download under it named '<atlas>-<page>-<name or title>.png' (Streamlit's own toolbar download
    is named by time only, so the app hides it; see app.py)."""
    kwargs.setdefault("width", "stretch")
    event = st.altair_chart(styled(ch), **kwargs)
    _chart_png_button(lambda: chart_png(ch), name or chart_title(ch) or "chart")
    return event


def spec_chart(spec: dict, png: Callable[[], bytes], name: str, **kwargs):
    """st.vega_lite_chart of a ready Vega-Lite spec (e.g. built once and cached: Altair checks a spec on
    every conversion, which a chart redrawn on every rerun need not repeat), with the PNG button of
    `chart`; `png` makes the PNG when clicked."""
    kwargs.setdefault("width", "stretch")
    event = st.vega_lite_chart(spec=spec, **kwargs)
    _chart_png_button(png, name)
    return event


def ready_chart(spec: dict, name: str, **kwargs):
    """`spec_chart` of a styled spec with its data inline (e.g. cached): the PNG is drawn from the same spec."""
    return spec_chart(spec, lambda: spec_png({**spec}), name, **kwargs)  # spec_png sets a top-level width


def _chart_png_button(png: Callable[[], bytes], label: str) -> None:
    n = st.session_state["_charts_drawn"] = st.session_state.get("_charts_drawn", 0) + 1
    page = st.session_state.get("_page_name", "")
    png_button(png, f"{page}-{label}" if page else label, key=f"chart_png_{n}", label="PNG of this chart")


def bar(df: pd.DataFrame, x: str, y: str, *, color: str | None = None, scale: alt.Scale | None = None,
        title: str = "", height: int = 260, sort="-y", horizontal: bool = False, tooltip=None,
        x_title: str | None = None, y_title: str | None = None) -> alt.Chart:
    """A plain bar chart; `color` + `scale` colour bars by a field (e.g. concept with concept_scale)."""
    enc_x = alt.X(f"{x}:N", sort=sort, title=x_title if x_title is not None else x, axis=alt.Axis(labelAngle=0))
    enc_y = alt.Y(f"{y}:Q", title=y_title if y_title is not None else y)
    if horizontal:
        enc_x, enc_y = (alt.X(f"{y}:Q", title=y_title if y_title is not None else y),
                        alt.Y(f"{x}:N", sort=sort.replace("y", "x") if isinstance(sort, str) else sort,
                              title=x_title if x_title is not None else x))
    enc = {"x": enc_x, "y": enc_y, "tooltip": tooltip or [x, alt.Tooltip(y, format=".3g")]}
    if color:
        enc["color"] = alt.Color(f"{color}:N", scale=scale or alt.Undefined, legend=None)
    return alt.Chart(df, title=title).mark_bar().encode(**enc).properties(height=height)
