"""Save and load nested training state without pickle: tensors in safetensors, the rest in JSON.

    save_state(dir, "state", {"optimizer": opt.state_dict(), "rng": ..., "step": 7})
    state = load_state(dir, "state")

writes `dir/state.safetensors` (every torch tensor, by a generated key) and `dir/state.json`
(the structure, with tensors replaced by {"__tensor__": key}). Tuples, dicts with non-string
keys (optimizer state is keyed by parameter index) and numpy arrays / scalars are tagged so
they come back as they went in. Loading runs no code from the files: JSON and safetensors only.
An unsupported type raises TypeError when saving (a bug to fix, not a format to guess).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__")


def _encode(obj: Any, tensors: dict) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot save a {type(obj).__name__} in training state")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(k: Any) -> Any:
    return tuple(k) if isinstance(k, list) else k


def save_state(directory: Path | str, name: str, state: Any) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict = {}
    structure = _encode(state, tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure) + "\n", encoding="utf-8")


def load_state(directory: Path | str, name: str) -> Any:
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(str(directory / f"{name}.safetensors"))
    return _decode(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")), tensors)
