"""`mlx-listen serve`: the model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from mlx_listen.errors import ListenWarning

from .options import DIR, FORCE, MODEL


def _named(specs, what: str) -> dict[str, Path]:
    """`NAME=PATH` or `PATH` (named after its file) for each spec, names distinct."""
    out = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(path)
        if not path.is_file():
            raise click.BadParameter(f"{path} is not a file", param_hint=what)
        name = name or path.stem
        if name in out:
            raise click.BadParameter(f"two {what} files are named {name!r}: write NAME=PATH", param_hint=what)
        out[name] = path
    return out


@click.command()
@MODEL
@click.option("--heads", "heads_specs", multiple=True, metavar="[NAME=]HEADS.json",
              help="A head set requests can name (repeat the option); the first is the default one. It gives "
                   "the listening score per token and the `+listen` / `+steer-a1` model aliases.")
@click.option("--vector", "vector_specs", multiple=True, metavar="[NAME=]VECTOR",
              help="A steering vector requests can name (`mlx-listen steer build`).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--allow-files", type=DIR, default=None,
              help="Let requests name audio files (file:// URLs) under this folder; off by default.")
@click.option("--name", default=None, help="The model id in /v1/models [default: the model folder's name].")
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait behind the one being answered; past that, a 503 at once.")
@click.option("--quiet", is_flag=True, help="No request log on stderr.")
@FORCE
def serve(model, heads_specs, vector_specs, host, port, allow_files, name, max_queue, quiet, force):
    """Serve the model over an OpenAI-compatible API: POST /v1/chat/completions (audio as
    input_audio or audio_url parts; streaming, logprobs, the `mlx_listen` extension), GET /v1/models,
    GET /health, POST /view (the viewer page for a request).

    \b
    mlx-listen serve --model qwen2-audio-4bit --heads HEADS.json
    curl http://127.0.0.1:8080/v1/models
    """
    from mlx_listen.headset import HeadSet
    from mlx_listen.identity import check_binding
    from mlx_listen.serve.engine import Engine
    from mlx_listen.serve.server import serve as run

    heads = {n: HeadSet.load(p) for n, p in _named(heads_specs, "--heads").items()}
    vectors = _named(vector_specs, "--vector")
    if host not in ("127.0.0.1", "localhost", "::1"):
        warnings.warn(f"listening on {host}: anyone who can reach it can use the model (no authentication)",
                      ListenWarning)
    engine = Engine(model, heads=heads, vectors=vectors, name=name)
    for label, hs in heads.items():
        for w in check_binding(hs.meta or {}, str(hs.path or label), model=engine.model, force=force):
            warnings.warn(w, ListenWarning)

    def ready(httpd):
        h, p = httpd.server_address[:2]
        click.echo(f"[INFO] serving {', '.join(engine.model_ids())} on http://{h}:{p}/v1", err=True)

    try:
        run(engine, host, port, allow_dir=allow_files.resolve() if allow_files else None, max_queue=max_queue, quiet=quiet, ready=ready)
    except OSError as e:
        raise click.ClickException(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
