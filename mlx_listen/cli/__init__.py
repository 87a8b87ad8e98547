"""`mlx-listen`: the command line, a thin click layer over `mlx_listen`, one module per command group.

Each command parses and checks its options (click types with ranges, so a bad number is a usage
error, exit 2, before anything loads), calls one library function and prints. A user error
(`ListenError`) becomes click's `Error: …` line and exit 1; warnings from the library print as
one `[WARNING] …` line each. Model code is imported inside the commands that need it, so
`--help`, `eval score` and `make-demo-set` start fast.
"""

from __future__ import annotations

import click

from mlx_listen import __version__

from .ask import ask, attention, view
from .drift import quant_drift
from .evaluate import evaluate, make_demo_set
from .heads import heads, validate_heads
from .model import convert, parity, version
from .options import Group
from .profile import profile
from .serve import serve
from .steer import steer
from .tools import ablate, experiment, patch


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(message="%(version)s", version=__version__, package_name="mlx-listen")
def main():
    """Run audio-language models (Qwen2-Audio) in MLX, see whether they listen to the audio, and
    steer them to listen more."""


for command in (ask, convert, parity, evaluate, make_demo_set, attention, view, heads, validate_heads, steer, patch,
                experiment, profile, ablate, serve, quant_drift, version):
    main.add_command(command)

if __name__ == "__main__":
    main()
