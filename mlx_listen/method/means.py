"""`mlx-listen ablate means`: every head's mean output over a data set's prompts, for
`--ablate-mode mean` (`interp.ablation.head_means` over the items, one prompt in memory at a time)."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from .. import presets
from ..errors import ListenError
from ..eval import mmau
from ..interp.ablation import head_means, save_means
from ..load import ModelRef
from ..prompt import prepare
from ..records import file_sha256


def means_from_data(model, data, audio_dir, out, *, limit=None, prompt: str = presets.DEFAULT_PRESET,
                    progress: bool = True):
    """`head_means` over `data`'s prompts (`model`: a folder, repo id or loaded pair), saved to `out`;
    items whose audio cannot be used are listed in the file's metadata."""
    items = mmau.load_items(data)[:limit]
    ref = ModelRef.of(model)
    mdl, processor = ref.get()
    failed, sizes = [], []

    def prompts():  # one at a time: the prompts of a whole data set would not fit in memory
        for item in tqdm(items, desc="means", unit="item", file=sys.stderr, disable=not progress):
            try:
                p = prepare(mdl, processor, [Path(audio_dir) / item["audio_id"]], presets.build_prompt(item, prompt))
            except ListenError as e:
                failed.append({"id": item["id"], "error": str(e)})
                continue
            sizes.append(len(p.ids))
            yield p

    means = head_means(mdl, prompts())
    meta = {"model": str(ref), "data_sha256": file_sha256(data), "prompt": prompt,
            "n_items": len(sizes), "n_positions": sum(sizes), "failed": failed, "positions": "every prompt position"}
    path = Path(out)
    save_means(path, means, meta)
    return path, meta
