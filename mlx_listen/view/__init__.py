"""The viewer: one self-contained HTML file that shows whether the model listened (no CDN, no
build step, works offline). `render(record)` embeds a record (`view.record.build`) with the
viewer's own small script and style; `write(record, path)` writes it atomically."""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

from ..records import write_atomic

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head><body>
<h1 id="title"></h1>
<main id="panels"></main>
<footer id="provenance"></footer>
<script>window.RECORD = {record};</script>
<script>{js}</script>
</body></html>
"""


def _asset(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def render(record: dict) -> str:
    """The page for one record, as a string."""
    data = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    data = data.replace("</", "<\\/")  # no string in the record can close the script element
    return PAGE.format(title=html.escape(record.get("title") or "mlx-listen"), css=_asset("viewer.css"),
                       js=_asset("viewer.js"), record=data)


def write(record: dict, path) -> Path:
    path = Path(path)
    write_atomic(path, render(record))
    return path
