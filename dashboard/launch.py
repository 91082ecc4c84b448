"""`lumen-dashboard --atlas A.h5 [--notes N.json]`: the review dashboard without knowing where app.py is.

Runs `streamlit run <installed dashboard/app.py> -- ARGS`; every argument goes to the app. Streamlit's
own options (e.g. --server.port) go before them when started as `streamlit run dashboard/app.py`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().with_name("app.py")


def atlas_argument(argv: list[str]) -> str | None:
    """`--atlas PATH` from the app's arguments (after `--`), else $LUMEN_ATLAS (read by the page script
    and by the server's start-up hook)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--atlas")
    args, _ = parser.parse_known_args([a for a in argv if a != "--"])
    return args.atlas or os.environ.get("LUMEN_ATLAS")


def streamlit_argv(args: list[str]) -> list[str]:
    """The argv Streamlit's command line gets for the app arguments `args`."""
    return ["streamlit", "run", str(APP), "--", *args]


def main() -> None:
    from streamlit.web import cli

    sys.argv = streamlit_argv(sys.argv[1:])
    sys.exit(cli.main())
