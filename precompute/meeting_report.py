"""The meeting report: one self-contained HTML file of an atlas and the names and notes given to its
concepts (`python -m precompute report ATLAS --html FILE` and the dashboard's download button).

Everything is inline (CSS, images as data: URIs), so the file opens offline, travels by e-mail and
prints to PDF from a browser (each concept starts on a new page). Sections: cohort, method and
settings, the meeting note, the concepts at a glance, fidelity, then per concept its name and notes,
prototypes, composition by diagnosis with slide counts, enrichment and fidelity line; example slides
with their cluster map, legend and scale bar; the atlas sha256 and the date. All text that comes from
the atlas or the notes is HTML-escaped. Reads through `precompute.store.Atlas`; no torch. Colours,
overlays and the enrichment definitions are the ones the dashboard uses (precompute/colors.py,
overlay.py, enrichment.py: numpy, pandas and PIL), so the report shows what the meeting saw.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from . import notes as notes_mod
from . import overlay
from .atomic import atomic_path
from .colors import concept_color
from .enrichment import by_diagnosis, enrichment_table
from .hashing import sha256_file
from .images import encode_image
from .report import report_dict
from .store import Atlas

N_PROTOTYPES = 8      # prototype crops shown per concept
N_EXAMPLES = 6        # example slides with their cluster map
EXAMPLE_PX = 560      # longest side of an example overlay image
MIN_SHARE = 0.2       # a slide "has" a concept when it holds at least this share of the slide's weight
NO_DIAGNOSIS = "(none)"

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;color:#111;max-width:1100px;
margin:1.5em auto;padding:0 1em;line-height:1.4;font-size:15px}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:2px solid #333}h3{margin:.4em 0}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums}
.chip{display:inline-block;width:1em;height:1em;border:1px solid #444;vertical-align:middle;margin-right:.35em}
.legend span.item{display:inline-block;margin-right:1.2em;white-space:nowrap}
.meta{color:#444;font-size:.9em}.note{white-space:pre-wrap;background:#f7f7f2;border-left:4px solid #999;
padding:.4em .8em}.protos figure,.slides figure{display:inline-block;margin:0 .5em .6em 0;text-align:center;
vertical-align:top}.protos img{width:96px;height:96px;image-rendering:pixelated}.protos figcaption,
.slides figcaption{font-size:.8em;max-width:560px}.bar{display:inline-block;height:.8em;background:#555}
section.concept{page-break-before:always;break-before:page}code{white-space:pre-wrap;word-break:break-all}
@media print{body{max-width:none;font-size:12px}h2{page-break-after:avoid}figure{page-break-inside:avoid}}
"""


def esc(value: Any) -> str:
    """HTML-escaped text of any value (quotes too: safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _img(data: bytes, mime: str, alt: str, **attrs: Any) -> str:
    extra = "".join(f' {k}="{esc(v)}"' for k, v in attrs.items())
    return f'<img src="data:{mime};base64,{base64.b64encode(data).decode("ascii")}" alt="{esc(alt)}"{extra}>'


def _chip(k: int) -> str:
    return f'<span class="chip" style="background:{concept_color(k)}"></span>'


def _fmt(value: Any, spec: str = ".3f") -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(v) else format(v, spec)


def _table(header: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """HTML table; cells are already-escaped HTML, columns in `numeric` right-aligned."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def legend(labels: list[str]) -> str:
    items = "".join(f'<span class="item">{_chip(j)}{esc(lab)}</span>' for j, lab in enumerate(labels))
    return f'<div class="legend">{items} <span class="item">(no colour: no tissue)</span></div>'


# -- reading -------------------------------------------------------------------------------------
def _gather(atlas: Atlas) -> dict[str, Any]:
    """What the report needs from the atlas: slide table, per-slide concept sums, prototypes."""
    slides = atlas.slides()
    t = atlas.tiles(["slide", "weights", "nmf_cluster"])
    k = atlas.k or np.asarray(t["weights"]).shape[1]
    s = len(slides["slide_id"])
    w = np.asarray(t["weights"], np.float64).reshape(-1, k)
    slide = np.asarray(t["slide"], np.int64)
    nmf = np.asarray(t["nmf_cluster"], np.int64)
    slide_weight = np.stack([np.bincount(slide, weights=w[:, j], minlength=s) for j in range(k)], axis=1) \
        if k else np.zeros((s, 0))
    slide_count = np.bincount(slide * k + nmf, minlength=s * k).reshape(s, k) if k else np.zeros((s, 0), int)
    diag = np.array([d if d else NO_DIAGNOSIS for d in slides["diagnosis"]], dtype=object)
    return {"attrs": atlas.attrs, "slides": slides, "k": k, "diag": diag, "slide_weight": slide_weight,
            "slide_count": slide_count, "protos": atlas.group("clusters/prototypes"),
            "relative_error": atlas.group_attrs("clusters").get("relative_error"), "n_tiles": atlas.n_tiles}


def _fidelity(path: Path) -> tuple[dict | None, str]:
    """report_dict of the atlas, or (None, why) when it cannot be computed for this atlas."""
    try:
        return report_dict(path), ""
    except Exception as exc:  # noqa: BLE001 - any failure only drops this section, with the reason shown
        return None, f"{type(exc).__name__}: {exc}"


# -- sections ------------------------------------------------------------------------------------
def _header(path: Path, sha: str, g: dict, now: str) -> str:
    a = g["attrs"]
    return (f"<h1>Lumen atlas report: {esc(path.name)}</h1>"
            f'<p class="meta">Report written {esc(now)} · atlas sha256 <code>{esc(sha)}</code><br>'
            f"atlas created {esc(a.get('created_utc', '?'))} by Lumen {esc(a.get('tool_version', '?'))} · "
            f"{len(g['slides']['slide_id'])} slides, {g['n_tiles']:,} tiles, K = {g['k']} concepts</p>")


def _cohort(g: dict) -> str:
    s = g["slides"]
    rows = []
    patients = np.asarray(s.get("patient", [""] * len(g["diag"])), dtype=object)
    for d in sorted(set(g["diag"])):
        m = g["diag"] == d
        st = np.asarray(s["status"], dtype=object)[m]
        pts = {p for p in patients[m] if p}
        rows.append([esc(d), str(int(m.sum())), str(int((st == "ok").sum())), str(int((st == "no_tissue").sum())),
                     str(int((st == "failed").sum())), f"{int(np.asarray(s['n_tiles'])[m].sum()):,}",
                     str(len(pts)) if pts else "–"])
    failed = [f"<li>{esc(i)}: {esc(e)}</li>" for i, st_, e in zip(s["slide_id"], s["status"], s["error"])
              if st_ == "failed"]
    out = "<h2>Cohort</h2>" + _table(["diagnosis", "slides", "ok", "no tissue", "failed", "tiles", "patients"],
                                     rows, numeric={1, 2, 3, 4, 5, 6})
    if failed:
        out += f"<p>Slides that failed:</p><ul>{''.join(failed)}</ul>"
    return out


def _method(g: dict) -> str:
    a, cfg = g["attrs"], g["attrs"].get("config", {}) or {}
    shape = a.get("layer_shape", "")
    shape = " × ".join(map(str, shape)) if isinstance(shape, list) else shape
    items = [("model", a.get("model_source")), ("model sha256", a.get("model_sha256")),
             ("layer (C × h × w)", f"{a.get('layer', '?')} ({shape})"),
             ("tile / stride", f"{cfg.get('tile_px', '?')} / {cfg.get('stride_px', '?')} px at "
                               f"{cfg.get('target_mpp', '?')} µm/px"),
             ("minimum tissue", cfg.get("min_tissue")), ("concepts", f"NMF, K = {g['k']}, seed {cfg.get('seed')}"),
             ("NMF relative reconstruction error", _fmt(g["relative_error"])),
             ("projection", cfg.get("projection")), ("device", a.get("device")),
             ("command", f"<code>{esc(a.get('command_line', ''))}</code>")]
    rows = [[esc(k), v if k == "command" else esc(v)] for k, v in items]
    return ("<h2>Method and settings</h2><p>Each tile's activations at the hooked layer are factorised with "
            "NMF into K concepts shared by the cohort; every cell gets non-negative weights per concept, and a "
            "tile's dominant concept is the one with the largest summed weight.</p>" + _table(["", ""], rows))


def _concepts_table(g: dict, labels: list[str], notes: notes_mod.Notes | None, fid: dict | None) -> str:
    count = g["slide_count"].sum(axis=0)
    weight = g["slide_weight"].sum(axis=0)
    rows = []
    for j in range(g["k"]):
        row = fid["clusters"][j] if fid and j < len(fid.get("clusters", [])) else {}
        rows.append([f"{_chip(j)}C{j + 1}", esc(notes.name(j) if notes else "") or "–", f"{int(count[j]):,}",
                     _fmt(weight[j] / weight.sum() if weight.sum() > 0 else float("nan"), ".1%"),
                     _fmt(row.get("coef"), "+.4g"), esc(row.get("direction", ""))])
    return ("<h2>Concepts at a glance</h2>" + legend(labels) +
            _table(["concept", "name", "tiles where it dominates", "share of all weight", "fidelity coefficient",
                    "direction"], rows, numeric={2, 3, 4}))


def _fidelity_section(fid: dict | None, why: str) -> str:
    if fid is None:
        return f"<h2>Fidelity</h2><p>Not available for this atlas ({esc(why)}).</p>"
    reg, out = fid.get("regression", {}), fid.get("output", {})
    notes = "".join(f"<li>{esc(n)}</li>" for n in fid.get("notes", []))
    return (f"<h2>Fidelity</h2><p>How much of the model's output <b>{esc(out.get('name'))}</b> (its logit) the "
            "concept weights of a tile explain, by linear regression over all tiles: R² in-sample "
            f"<b>{_fmt(reg.get('r2'))}</b>, cross-validated <b>{_fmt(reg.get('r2_cv'))}</b> (tiles of one "
            f"{esc(fid.get('grouping', 'slide'))} kept together, {esc(reg.get('n_folds') or 'no')} folds). "
            "A positive coefficient: more of the concept raises the output.</p>" + (f"<ul>{notes}</ul>" if notes else ""))


def _composition(g: dict, j: int, labels: list[str]) -> str:
    """Per diagnosis: share of the concept's weight, the diagnosis' share of all weight, slide counts."""
    has = g["slide_weight"].sum(axis=1) > 0
    diags = sorted({d for d, h in zip(g["diag"], has) if h})
    if not diags:
        return "<p>No slide has tiles.</p>"
    long = by_diagnosis(g["slide_weight"][has], g["diag"][has], diags, min_share=MIN_SHARE, labels=labels)
    mine = long[long["concept"] == labels[j]]
    total_j = g["slide_weight"][:, j].sum()
    total = g["slide_weight"].sum()
    rows = []
    for d in diags:
        r = mine[mine["diagnosis"] == d].iloc[0]
        m = g["diag"] == d
        share = float(g["slide_weight"][m, j].sum() / total_j) if total_j > 0 else 0.0
        expected = float(g["slide_weight"][m].sum() / total) if total > 0 else 0.0
        enr = enrichment_table(g["slide_weight"][has], g["diag"][has], d, min_share=MIN_SHARE, labels=labels)
        log2 = float(enr.loc[enr["concept"] == labels[j], "log2_enrichment"].iloc[0]) if len(diags) > 1 else float("nan")
        rows.append([esc(d), f'<span class="bar" style="width:{share * 8:.2f}em;background:{concept_color(j)}">'
                     f"</span> {share:.1%}", f"{expected:.1%}", f"{float(r['share_of_diagnosis_weight']):.1%}",
                     f"{int(r['slides_ge'])} / {int(r['slides'])}", f"{int(g['slide_count'][m, j].sum()):,}",
                     _fmt(log2, "+.2f")])
    return _table(["diagnosis", "share of the concept's weight", "share of all weight",
                   "concept's share of the diagnosis' weight", f"slides with ≥ {MIN_SHARE:.0%} / slides",
                   "tiles where it dominates", "log2 enrichment vs the other diagnoses"], rows,
                  numeric={2, 3, 4, 5, 6})


def _prototypes(atlas: Atlas, g: dict, j: int) -> str:
    p = g["protos"]
    if "cluster" not in p:
        return "<p>This atlas stores no prototypes.</p>"
    rows = np.flatnonzero(np.asarray(p["cluster"]) == j)
    rows = rows[np.argsort(-np.asarray(p["weight"])[rows], kind="stable")][:N_PROTOTYPES]
    if not len(rows):
        return "<p>No prototypes.</p>"
    crops = atlas.ragged("clusters/prototypes", "jpeg", [int(r) for r in rows])
    ids = g["slides"]["slide_id"]
    figs = "".join(f"<figure>{_img(c, 'image/jpeg', f'prototype {i + 1}')}<figcaption>{esc(ids[int(p['slide'][r])])}"
                   f"<br>w {float(p['weight'][r]):.2f}</figcaption></figure>" for i, (r, c) in enumerate(zip(rows, crops)))
    return (f'<div class="protos">{figs}</div><p class="meta">Prototypes: the top-weight cells of the concept over the '
            "cohort, each shown with one cell of context around it (slide and weight below).</p>")


def _concept_section(atlas: Atlas, g: dict, j: int, labels: list[str], notes: notes_mod.Notes | None,
                     fid: dict | None) -> str:
    name = notes.name(j) if notes else ""
    note = notes.concept_note(j) if notes else ""
    title = f"C{j + 1}" + (f" · {esc(name)}" if name else " (not named)")
    row = fid["clusters"][j] if fid and j < len(fid.get("clusters", [])) else None
    fid_line = ""
    if row:
        fid_line = (f"<p>Fidelity: coefficient {_fmt(row.get('coef'), '+.4g')} on {esc(fid['output']['name'])} "
                    f"({esc(row.get('direction', ''))}), effect per SD {_fmt(row.get('effect_sd'), '+.3f')}")
        if fid.get("gradcam") and row.get("cam_r_mean") is not None:
            fid_line += (f"; GradCAM r {_fmt(row.get('cam_r_mean'), '+.2f')} ± {_fmt(row.get('cam_r_std'), '.2f')} "
                         f"over {esc(row.get('cam_n'))} tiles")
        fid_line += ".</p>"
    return (f'<section class="concept"><h2>{_chip(j)}{title}</h2>'
            + (f'<div class="note">{esc(note)}</div>' if note else "<p class=\"meta\">No notes.</p>")
            + "<h3>Prototypes</h3>" + _prototypes(atlas, g, j)
            + "<h3>Composition by diagnosis</h3>" + _composition(g, j, labels) + fid_line + "</section>")


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 x 10^n not above `target` (> 0): the scale bar's length."""
    exp = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10 ** exp <= target:
            return m * 10 ** exp
    return 10 ** exp


def draw_scale_bar(img: Image.Image, um_per_px: float) -> Image.Image:
    """Draw a scale bar (about a fifth of the width, a round number of um or mm) at the bottom left."""
    length_um = nice_length(img.width * 0.2 * um_per_px)
    bar = max(1, round(length_um / um_per_px))
    font, has_mu = overlay.label_font(14)  # the dashboard viewer's font: DejaVu when present (Pillow's has no µ)
    text = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} {'µm' if has_mu else 'um'}"
    draw = ImageDraw.Draw(img)
    tw = draw.textlength(text, font=font)
    x0, y1 = 8, img.height - 8
    draw.rectangle([x0 - 4, y1 - 30, x0 + max(bar, tw) + 4, y1 + 4], fill="white")
    draw.rectangle([x0, y1 - 6, x0 + bar, y1], fill="black")
    draw.text((x0, y1 - 28), text, fill="black", font=font)
    return img


def example_slides(g: dict, n: int = N_EXAMPLES) -> list[int]:
    """Up to n slides with tiles, taking diagnoses in turn, each's slides with the most tiles first."""
    s = g["slides"]
    ok = [i for i in range(len(s["slide_id"])) if s["status"][i] == "ok" and int(s["n_tiles"][i]) > 0]
    queues = {}
    for i in sorted(ok, key=lambda i: -int(s["n_tiles"][i])):
        queues.setdefault(g["diag"][i], []).append(i)
    out: list[int] = []
    while len(out) < n and any(queues.values()):
        for d in sorted(queues):
            if queues[d] and len(out) < n:
                out.append(queues[d].pop(0))
    return out


def slide_overlay(atlas: Atlas, i: int, k: int, mpp: float, opacity: float = 0.55) -> tuple[bytes, str] | None:
    """JPEG of slide i's thumbnail under its cluster map, with a scale bar; and a caption note."""
    maps = atlas.slide_maps(i)
    if maps is None or "hard" not in maps.arrays:
        return None
    thumb = maps["thumbnail"]
    h, w = thumb.shape[:2]
    ds, cell = float(maps.attrs["thumb_downsample"]), float(maps.attrs["cell_l0"])
    rgba = overlay.grid_to_thumb(overlay.hard_rgba(maps["hard"], k), cell, ds, (w, h))
    img = Image.fromarray(overlay.blend(thumb, rgba, opacity))
    f = min(1.0, EXAMPLE_PX / max(w, h))
    if f < 1:
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)
    note = ""
    if math.isfinite(mpp) and mpp > 0:
        img = draw_scale_bar(img, mpp * ds * w / img.width)
    else:
        note = "pixel size unknown: no scale bar"
    return encode_image(img, "JPEG", 85), note


def _examples(atlas: Atlas, g: dict, labels: list[str]) -> str:
    s = g["slides"]
    figs = []
    for i in example_slides(g):
        made = slide_overlay(atlas, i, g["k"], float(s["mpp"][i]))
        if made is None:
            continue
        jpeg, note = made
        cap = (f"{esc(s['slide_id'][i])} · {esc(g['diag'][i])} · {int(s['n_tiles'][i]):,} tiles · "
               f"{_fmt(s['mpp'][i], '.3g')} µm/px" + (f" · {note}" if note else ""))
        figs.append(f"<figure>{_img(jpeg, 'image/jpeg', str(s['slide_id'][i]))}<figcaption>{cap}</figcaption></figure>")
    if not figs:
        return "<h2>Example slides</h2><p>No slide has a cluster map.</p>"
    return ('<section class="concept"><h2>Example slides</h2><p>Each cell of the cluster map in the colour of its '
            "dominant concept over the slide thumbnail.</p>" + legend(labels) + f'<div class="slides">{"".join(figs)}'
            "</div></section>")


def build_report(path: str | os.PathLike, notes: notes_mod.Notes | None = None, *, sha256: str | None = None,
                 now: str | None = None) -> str:
    """The whole report as one HTML string. `notes`: names and notes of the concepts (None: unnamed)."""
    path = Path(path)
    sha = sha256 or sha256_file(path)
    now = now or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    fid, why = _fidelity(path)
    with Atlas(path) as atlas:
        g = _gather(atlas)
        labels = notes_mod.labels(g["k"], notes)
        parts = [_header(path, sha, g, now), _cohort(g), _method(g)]
        if notes and notes.note:
            parts.append(f'<h2>Meeting notes</h2><div class="note">{esc(notes.note)}</div>')
        parts += [_concepts_table(g, labels, notes, fid), _fidelity_section(fid, why)]
        parts += [_concept_section(atlas, g, j, labels, notes, fid) for j in range(g["k"])]
        parts.append(_examples(atlas, g, labels))
    parts.append(f'<p class="meta">Atlas {esc(path.name)}, sha256 {esc(sha)}; report written {esc(now)}.</p>')
    title = f"Lumen atlas report: {path.name}"
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body>{''.join(parts)}</body></html>\n")


def write_report(path: str | os.PathLike, out: str | os.PathLike, notes: notes_mod.Notes | None = None) -> Path:
    """Write build_report(...) to `out` atomically (the sha256 checked against the notes is reused). Returns `out`."""
    text = build_report(path, notes, sha256=notes.atlas_sha256 if notes else None)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
