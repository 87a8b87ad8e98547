"""Views of a whole run: an `eval` or `experiment` folder gets `views/index.html`, a table of its
items (task, the answer, right or wrong, the listening score where the run recorded one) linking
one viewer page per item (`view.record.build`), written item by item (resumable: a page already
written is kept) with the run's own model, data and prompt preset."""

from __future__ import annotations

import html
import sys
from pathlib import Path

from tqdm import tqdm

from .. import presets
from ..errors import ListenError
from ..eval import mmau
from ..headset import HeadSet
from ..load import ModelRef
from ..records import read_json, read_jsonl, write_atomic
from . import write
from .record import build

INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font: 14px system-ui, sans-serif; margin: 24px auto; max-width: 980px; color: #1a202c; }}
table {{ border-collapse: collapse; width: 100%; }} th, td {{ border-bottom: 1px solid #e2e8f0; padding: 4px 6px;
text-align: left; }} .right {{ color: #276749; }} .wrong {{ color: #9b2c2c; }} td.num {{ text-align: right; }}
code {{ font-size: 12px; }}</style></head><body>
<h1>{title}</h1><p>{summary}</p>
<table><tr><th>item</th><th>task</th><th>answer</th><th></th><th>listening</th></tr>
{rows}
</table></body></html>
"""


def _run_rows(run: Path) -> tuple[dict, list[dict]]:
    """The run's identity (model, data, prompt) and its per-item rows, for an eval or an experiment folder."""
    for ident_file, rows_file in (("run.json", "predictions.jsonl"), ("experiment.json", "base.jsonl")):
        if (run / ident_file).is_file():
            ident = read_json(run / ident_file, "run identity file")
            rows = read_jsonl(run / rows_file)
            if not rows:
                raise ListenError(f"{run / rows_file} holds no items yet")
            return ident, rows
    raise ListenError(f"{run} is neither an eval run (run.json) nor an experiment (experiment.json)")


def _answer(row: dict) -> str:
    return row.get("model_output", row.get("answer", row.get("error", "")))


def write_views(run, audio_dir, *, heads: HeadSet | None = None, model=None, limit: int | None = None,
                max_tokens: int = 64, progress: bool = True) -> Path:
    """`RUN/views/index.html` and one page per item (the first `limit`); `model` overrides the run's."""
    run = Path(run)
    ident, rows = _run_rows(run)
    data = Path(ident.get("data") or "")
    if not data.is_file():
        raise ListenError(f"the run's data file {data} is gone; the views need its questions")
    items = {it["id"]: it for it in mmau.load_items(data)}
    preset = ident.get("prompt") or presets.DEFAULT_PRESET
    ref = ModelRef.of(model if model is not None else ident.get("model"))
    if heads is not None:
        n_layers, n_heads = ref.shape
        heads.check(n_layers, n_heads)
    out = run / "views"
    out.mkdir(exist_ok=True)
    rows = [r for r in rows if r.get("id") in items][:limit]
    todo = [r for r in rows if "error" not in r and not (out / f"{_slug(r['id'])}.html").exists()]
    for r in tqdm(todo, desc="views", unit="item", file=sys.stderr, disable=not progress or not todo):
        item = items[r["id"]]
        record = build(ref, Path(audio_dir) / item["audio_id"], presets.build_prompt(item, preset), heads=heads,
                       choices=item["choices"], preset=preset, max_tokens=max_tokens, name=item["audio_id"])
        record["title"] = f"{item['id']} · {item['task']} · answer key: {item['answer']}"
        write(record, out / f"{_slug(r['id'])}.html")
    lines = []
    for r in rows:
        page = out / f"{_slug(r['id'])}.html"
        ok = r.get("correct")
        mark = "" if ok is None else ('<span class="right">right</span>' if ok else '<span class="wrong">wrong</span>')
        listen = r.get("listening")
        name = html.escape(r["id"])
        link = f'<a href="{page.name}">{name}</a>' if page.exists() else name
        lines.append(f"<tr><td><code>{link}</code></td><td>{html.escape(str(r.get('task', '')))}</td>"
                     f"<td><code>{html.escape(_answer(r)[:80])}</code></td><td>{mark}</td>"
                     f"<td class=\"num\">{'' if listen is None else f'{listen:.4f}'}</td></tr>")
    n_right = sum(bool(r.get("correct")) for r in rows)
    summary = (f"{len(rows)} items, {n_right} right; model {html.escape(str(ident.get('model')))}, prompt "
               f"{html.escape(preset)}, data {html.escape(str(data))}. Each item links its page.")
    index = out / "index.html"
    write_atomic(index, INDEX.format(title=html.escape(f"mlx-listen · {run.name}"), summary=summary,
                                     rows="\n".join(lines)))
    return index


def _slug(item_id: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(item_id))
