"""Finding and loading a model: a local folder (HF or converted MLX) or a hub repo id.

An HF folder loads directly: converting it is only key surgery (the family's `sanitize`), done at
load time, so there is no need to keep a second 17 GB copy. The family comes from `config.json`'s
`model_type` (`models.classes`).

`ModelRef` is what every run takes as its model: a folder or repo id, or a model already loaded.
What the config says (shape, weight fingerprint) is known without loading, so a run checks its
inputs first and loads only when there is work to do, once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path

import mlx.core as mx
from huggingface_hub import constants, snapshot_download
from mlx_lm.utils import load_config, load_tokenizer
from mlx_lm.utils import load_model as mlx_lm_load_model

from .chat import Processor, find_chat_template, messages_for
from .errors import ListenError, ModelError
from .models import DEFAULT_MODEL, classes, family, family_if_known, front_end, model_config  # noqa: F401
from .models.base import AudioLM

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model"]


def resolve(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id, fetched through huggingface-hub's cache."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; --model takes a model folder or a hub repo id")
        return path
    repo = str(path_or_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise ModelError(f"model folder {repo} not found (and it is not a hub repo id like Org/Name)")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # the hub's errors are many; the user needs one line
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        # Offline, the advice to go offline is wrong: say what offline means instead.
        hint = ("unset HF_HUB_OFFLINE to download it" if constants.HF_HUB_OFFLINE
                else "set HF_HUB_OFFLINE=1 to use the hub cache only")
        raise ModelError(
            f"could not get {repo} from the Hugging Face hub ({reason}); pass a local folder "
            f"with --model /path/to/model, or {hint}"
        ) from None


def read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise ModelError(f"{path} has no config.json: not a model folder")
    try:  # read it ourselves first: mlx-lm indexes into whatever the file holds
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError: a truncated or hand-edited file
        raise ModelError(f"{path}: config.json is not valid JSON ({_short(e)})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: config.json holds a JSON {type(raw).__name__}, not a model config object")
    try:
        return load_config(path)
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:  # a bad generation_config.json
        raise ModelError(f"{path}: cannot read the model config ({_short(e)})") from None


def _check_shards(path: Path):
    """Every weight file the index names (or the `-of-N` names promise) must be there; else mlx-lm
    only says 'Missing N parameters'."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index} is not a valid weight index ({_short(e)})") from None
        where = "listed in model.safetensors.index.json"
    else:
        names, where = set(), "of the numbered set"
        for f in path.glob("model-*-of-*.safetensors"):
            m = re.fullmatch(r"model-(\d+)-of-(\d+)\.safetensors", f.name)
            if m:
                width, total = len(m.group(1)), int(m.group(2))
                names |= {f"model-{i:0{width}d}-of-{m.group(2)}.safetensors" for i in range(1, total + 1)}
    missing = sorted(n for n in names if not (path / n).is_file())
    if missing:
        raise ModelError(f"{path}: weight file{'s' if len(missing) > 1 else ''} {', '.join(missing)} {where} "
                         "missing (an interrupted download or copy?)")


def load_model(path: Path, lazy: bool = False) -> tuple[AudioLM, dict]:
    """mlx-lm's loader (safetensors, quantisation block, strict load) with the family's classes."""
    config = read_config(path)
    try:
        model_config(config)
    except ValueError as e:
        raise ModelError(f"{path}: {e}") from None
    if not list(path.glob("model*.safetensors")):
        raise ModelError(f"{path} has no model*.safetensors weight files")
    _check_shards(path)
    try:
        model, config = mlx_lm_load_model(path, lazy=True, get_model_classes=classes)
    except ValueError as e:
        raise ModelError(f"{path}: weights do not match the config: {_short(e)}") from None
    except (RuntimeError, OSError) as e:  # mx.load on a truncated or non-safetensors file
        raise ModelError(f"{path}: cannot read the weight files ({_short(e)})") from None
    if not lazy:
        mx.eval(model.parameters())
    model.path = path  # where it came from (a plain attribute: not a parameter)
    model.front_end = folder_front_end(path, config)
    return model, config


def folder_front_end(path: Path, config: dict):
    """The family's audio front end from the folder's config and processor files (no weights needed)."""
    try:
        return front_end(config, path)
    except (ValueError, TypeError, ListenError) as e:
        raise ModelError(f"{path}: cannot set up the audio front end ({_short(e)})") from None


def model_shape(path_or_repo: str | Path) -> tuple[int, int]:
    """(decoder layers, heads per layer) from the config alone, without loading weights."""
    path = resolve(path_or_repo)
    try:
        text = model_config(read_config(path)).text_config
    except ValueError as e:
        raise ModelError(f"{path}: {e}") from None
    return text.num_hidden_layers, text.num_attention_heads


def load_processor(path: Path, config: dict) -> Processor:
    eos = config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    if not (path / "tokenizer.json").exists() and not (path / "vocab.json").exists():
        raise ModelError(f"{path} has no tokenizer (tokenizer.json, or vocab.json and merges.txt); "
                         "copy the tokenizer files from the original checkpoint")
    hf_log = logging.getLogger("transformers")  # the library's root logger (no import of transformers here)
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # its config checks of parts we never run (Omni's talker) are noise here
    try:
        tok = load_tokenizer(path, eos_token_ids=eos)
    except Exception as e:
        raise ModelError(f"{path}: cannot load the tokenizer ({_short(e)})") from None
    finally:
        hf_log.setLevel(level)
    try:
        template = find_chat_template(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path}: cannot read the chat template ({_short(e)})") from None
    fam = family(config)
    try:
        processor = Processor(tok, template, placeholder=fam.placeholder, family=fam.name, builtin=fam.builtin_template)
    except ListenError as e:
        raise ModelError(f"{path}: {e}") from None
    try:  # a broken template must stop here, not fail every item of a run
        processor.render(messages_for("test", 1))
    except ListenError as e:
        raise ModelError(f"{path}: {e}") from None
    return processor


def load(path_or_repo: str | Path = DEFAULT_MODEL, lazy: bool = False) -> tuple[AudioLM, Processor]:
    """`model, processor = load("Qwen/Qwen2-Audio-7B-Instruct")` (a folder works too)."""
    path = resolve(path_or_repo)
    model, config = load_model(path, lazy=lazy)
    return model, load_processor(path, config)


FINGERPRINT_VERSION = 2


def weights_fingerprint(path: Path) -> str:
    """A short hash that names the exact weights of a folder without loading them: the config and,
    per weight file, its safetensors header and a few KB from the start, middle and end of every
    tensor (so a change to any one tensor, e.g. a fine-tuned top layer, changes it; ~3 MB read at
    7B). Two copies of the same folder agree wherever they sit; another checkpoint does not."""
    h = hashlib.sha256(f"v{FINGERPRINT_VERSION}".encode())
    h.update((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    for f in sorted(path.glob("model*.safetensors")):
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ModelError(f"{f} is truncated (not a safetensors file)")
            n = struct.unpack("<Q", raw)[0]
            header = fh.read(n)
            h.update(f.name.encode() + header)
            try:
                entries = [v for k, v in sorted(json.loads(header).items()) if k != "__metadata__"]
            except (ValueError, UnicodeDecodeError, AttributeError):
                raise ModelError(f"{f} is not a safetensors file (bad header)") from None
            for e in entries:
                start, end = e["data_offsets"]
                for at in {start, (start + end) // 2, max(start, end - 1024)}:
                    fh.seek(8 + n + at)
                    h.update(fh.read(min(1024, end - at)))
    return h.hexdigest()[:16]


class ModelRef:
    """A model by folder or repo id (`ModelRef("Qwen/Qwen2-Audio-7B-Instruct")`), or one already
    loaded (`ModelRef((model, processor))`): what every run takes as `model`. `shape` and
    `fingerprint` need no weights; `get()` loads on first use and keeps the pair."""

    def __init__(self, model):
        if isinstance(model, ModelRef):
            self.spec, self._loaded = model.spec, model._loaded
        elif isinstance(model, tuple):
            self._loaded = model
            self.spec = getattr(model[0], "path", None)
        else:
            self.spec, self._loaded = model, None

    @classmethod
    def of(cls, model) -> "ModelRef":
        return model if isinstance(model, ModelRef) else cls(model)

    def __str__(self) -> str:
        return str(self.spec)

    @property
    def path(self) -> Path:
        if self.spec is None:
            raise ModelError("this model was not loaded from a folder: its weights cannot be fingerprinted")
        return resolve(self.spec)

    @property
    def shape(self) -> tuple[int, int]:
        """(decoder layers, heads per layer)."""
        if self._loaded is not None:
            return self._loaded[0].n_layers, self._loaded[0].n_heads
        return model_shape(self.spec)

    @property
    def family(self) -> str:
        """The family's `model_type` (`models.FAMILIES`), from the config alone."""
        if self._loaded is not None:
            return self._loaded[0].family
        return family(self._config()).model_type

    @property
    def front_end(self):
        """The family's audio front end, from the config alone: clips are checked before the model loads."""
        if self._loaded is not None:
            return self._loaded[0].front_end
        return folder_front_end(self.path, self._config())

    def _config(self) -> dict:
        path = self.path
        config = read_config(path)
        try:
            model_config(config)
        except ValueError as e:
            raise ModelError(f"{path}: {e}") from None
        return config

    def fingerprint(self) -> str:
        return weights_fingerprint(self.path)

    def get(self) -> tuple[AudioLM, Processor]:
        if self._loaded is None:
            self._loaded = load(self.spec)
        return self._loaded


def _short(e: Exception, limit: int = 400) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= limit else s[:limit] + " …"

