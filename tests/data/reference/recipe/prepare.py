"""Build what the CUDA reference run needs (run here, with the tests' torch): the two tiny
checkpoints exactly as the tests build them (tests/support/__init__.py), and the three clips of items.json.

    cd /tmp && python /path/to/repo/tests/data/reference/recipe/prepare.py /path/to/repo/.gpu
"""

import json
import shutil
import sys
from pathlib import Path

import soundfile as sf

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parents[2]))  # tests/, for the recipe in tests/support
from support import INIT, SR, VARIANTS, tone  # noqa: E402

from mlx_listen_convert.reference.tiny import build_tiny  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
for name, kw in VARIANTS.items():
    build_tiny(out / f"{name}-hf", init_range=INIT, **kw)
for k, (secs, freq) in enumerate([(1.0, 440.0), (2.5, 300.0), (6.0, 880.0)]):
    sf.write(out / f"clip{k}.flac", tone(secs, freq, seed=k), SR)
for f in ("items.json", "H.json", "run.sh"):
    shutil.copy(here / f, out / f)
print(json.dumps(sorted(p.name for p in out.iterdir())))
