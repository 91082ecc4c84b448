"""What one redraw of the Overview's scatter costs, and how much of it grows with the points drawn.

    python bench/scatter_redraw.py [--atlas bench/out/dashboard-1000000-new.h5] [--points 2000 5000 10000]

One dashboard server and one headless Chromium (1920 x 1080) for every point count, side by side:
for each count in turn (several rounds, interleaved, against the machine's drift) one tab opens the
Overview with `points=N` and switches "Colour by" between Diagnosis and NMF concept `--toggles` times.
A switch is timed from the option's click until the URL shows the new colouring, the script is idle
and two frames are drawn (as in bench/dashboard.py); the renderer's main-thread time of the switch comes
from Chrome's Performance metrics (TaskDuration). Prints medians per count, the ratio to the app's
default count, and a least-squares line through the medians: the fixed cost of a redraw (page update,
chart set-up) and the cost per 1,000 points.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# bench/dashboard.py shares its server, browser, option picking and idle wait ("dashboard" as a module
# name would be the app's package, so it is loaded from its file)
_spec = importlib.util.spec_from_file_location("bench_dashboard", HERE / "dashboard.py")
bd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bd)
from browser_harness import missing_browser  # noqa: E402  (on the path once bench/dashboard.py is loaded)


def _metric(cdp, name: str) -> float:
    return next(m["value"] for m in cdp.send("Performance.getMetrics")["metrics"] if m["name"] == name)


def _switches(context, url: str, points: int, toggles: int) -> list[tuple[float, float]]:
    """(wall s, main-thread s) of `toggles` colour switches on a fresh Overview tab drawing `points`."""
    page = context.new_page()
    page.goto(f"{url}/?page=overview&points={points}")
    page.wait_for_selector(bd.SCATTER, timeout=120_000)
    bd._idle(page, 120_000)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text="Colour by").first
    out = []
    for i in range(toggles):
        option = page.get_by_role("option", name="Diagnosis" if i % 2 == 0 else "NMF concept", exact=True)
        page.wait_for_timeout(500)  # let the previous switch's late work (GC, paint) finish first
        busy0 = _metric(cdp, "TaskDuration")
        switch = bd._url_change(page, lambda: bd._choose(page, box, option), "color")
        t0 = switch()
        bd._idle(page)
        out.append((time.perf_counter() - t0, _metric(cdp, "TaskDuration") - busy0))
    page.close()
    return out


def measure(atlas: Path, counts: list[int], toggles: int, rounds: int) -> dict:
    runs: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
    with bd.dashboard_server(atlas) as srv, bd.chromium() as browser:
        context = browser.new_context(viewport={"width": 1920, "height": 1080})
        _switches(context, srv["url"], counts[0], 2)  # warm-up: the server's caches, the browser's scripts
        for _ in range(rounds):
            for n in counts:
                runs[n] += _switches(context, srv["url"], n, toggles)
    med = {n: (statistics.median(w for w, _ in r), statistics.median(b for _, b in r)) for n, r in runs.items()}
    slope, fixed = np.polyfit(counts, [med[n][1] for n in counts], 1) if len(counts) > 1 else (0.0, med[counts[0]][1])
    return {"atlas": str(atlas), "switches_per_count": toggles * rounds,
            "median_wall_s": {n: round(m[0], 3) for n, m in med.items()},
            "median_main_thread_s": {n: round(m[1], 3) for n, m in med.items()},
            "main_thread_fixed_s": round(float(fixed), 3), "main_thread_per_1000_points_s": round(float(slope) * 1000, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--atlas", type=Path, default=bd.ROOT / "bench" / "out" / "dashboard-1000000-new.h5")
    # the app draws its default for a count it does not offer: only its choices measure what they say
    ap.add_argument("--points", type=int, nargs="+", default=[2000, 5000, 10000], choices=bd.POINT_CHOICES,
                    help=f"point counts to compare, among the app's 'Points drawn' choices ({bd.DEFAULT_POINTS:,} "
                         "is the default)")
    ap.add_argument("--toggles", type=int, default=6, help="colour switches per tab")
    ap.add_argument("--rounds", type=int, default=2, help="tabs per point count, interleaved")
    args = ap.parse_args()
    if missing := missing_browser():
        raise SystemExit(missing)
    if not args.atlas.exists():
        raise SystemExit(f"{args.atlas} not found: build it with `python bench/dashboard.py` (it writes the "
                         "10^6-tile atlas there), or pass --atlas")
    res = measure(args.atlas, sorted(args.points), args.toggles, args.rounds)
    base = res["median_wall_s"].get(bd.DEFAULT_POINTS)
    print(f"{'points':>8} {'wall':>7} {'main thread':>12} {'wall / default':>15}")
    for n in sorted(args.points):
        ratio = f"{res['median_wall_s'][n] / base:.2f}" if base else "-"
        print(f"{n:>8,} {res['median_wall_s'][n]:>6.2f}s {res['median_main_thread_s'][n]:>11.2f}s {ratio:>15}")
    print(f"main thread per redraw: {res['main_thread_fixed_s']:.2f} s fixed + "
          f"{res['main_thread_per_1000_points_s']:.3f} s per 1,000 points")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
