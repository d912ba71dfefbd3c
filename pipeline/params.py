"""Typed parameters for methods and selectors: one parser for `--param`, recipes and Python.

    @dataclass(frozen=True)
    class SemDeDupParams:
        eps: float = field(default=0.05, metadata={"help": "duplicate when cos sim >= 1 - eps"})
        keep: Literal["hard", "easy", "random"] = "hard"

    parse_params(SemDeDupParams, {"eps": "0.1"})      # SemDeDupParams(eps=0.1, keep='hard')
    parse_params(SemDeDupParams, {"epz": "0.1"})      # ValueError: unknown parameter 'epz' ...

Validation is pydantic's (lax mode: "0.1" -> 0.1, "true"/"false"/"1"/"0"/"yes"/"no" -> bool,
Literal values checked), the same whether values come from the command line (strings), a YAML
recipe or Python. An unknown key is an error naming the valid keys.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal

import pydantic


def check_share(value: float, name: str = "max_share") -> float:
    """A share of the budget: in (0, 1]. The one check of every diversity guard's cap."""
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


# A parameter that is a share of the budget (`max_share`): declared once, checked when parsed.
Share = Annotated[float, pydantic.AfterValidator(lambda v, info: check_share(v, info.field_name))]


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_text(a) for a in typing.get_args(tp) if a is not type(None)) + " (optional)"
    if origin in (tuple, list):
        return f"list of {_type_text(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and type(None) in typing.get_args(tp)


def _split_lists(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """Comma-separated strings become lists for tuple/list fields (`--param seeds=0,1,2`);
    "null" or "none" is None for a field that may be None (`--param min_doc_words=null`)."""
    hints = typing.get_type_hints(cls)
    out = dict(raw)
    for k, v in raw.items():
        if isinstance(v, str) and v.strip().lower() in ("null", "none") and _optional(hints.get(k)):
            out[k] = None
            continue
        origin = typing.get_origin(hints.get(k))
        if origin in (tuple, list) and isinstance(v, str):
            out[k] = [x.strip() for x in v.split(",") if x.strip()]
        elif origin in (tuple, list) and isinstance(v, int | float):
            out[k] = [v]
    return out


def parse_params(cls: type, raw: dict[str, Any] | None, what: str = "parameter") -> Any:
    """An instance of the dataclass `cls` from loosely typed values; one-line errors."""
    raw = {k.replace("-", "_"): v for k, v in (raw or {}).items()}
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        valid = ", ".join(names) if names else "(none)"
        raise ValueError(f"unknown {what} {unknown[0]!r}; valid: {valid}")
    try:
        return pydantic.TypeAdapter(cls).validate_python(_split_lists(cls, raw))
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        if not err["loc"] or err["type"] == "value_error":   # the class's own checks: their message
            msg = err["msg"].removeprefix("Value error, ")
            raise ValueError(f"bad {what}: {msg}") from None
        key = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{what} {key}={err.get('input')!r}: {err['msg']}") from None


def describe_params(cls: type) -> list[dict]:
    """Name, type, default and help of every parameter (for `thresher methods`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp = hints[f.name]
        entry = {"name": f.name, "type": _type_text(tp), "default": default,
                 "help": f.metadata.get("help", "")}
        if typing.get_origin(tp) is Literal:
            entry["choices"] = list(typing.get_args(tp))
        out.append(entry)
    return out


NAMESPACES = ("method", "selector")


def route_params(raw: dict[str, Any] | None, method: type, selector: type | None,
                 names: tuple[str, str] = ("the method", "the selector")) -> tuple[dict, dict]:
    """(method keys, selector keys) of `--param`s. `method.KEY` and `selector.KEY` name their
    owner; a bare KEY goes to the one class that declares it, and a bare KEY that both declare is
    an error asking for the qualified form (scikit-learn's `step__param` idea: one key never
    reaches the wrong class silently). `selector` is None when no `--selector` was named: the
    method's own cut takes its settings from method parameters.

        route_params({"keep": "bottom"}, PerplexityParams, ScoreBand)          # ValueError
        route_params({"selector.keep": "bottom"}, PerplexityParams, ScoreBand)  # ({}, {"keep": ...})
    """
    owners = {"method": method, "selector": selector}
    declared = {ns: {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
                for ns, cls in owners.items()}
    out: dict[str, dict] = {"method": {}, "selector": {}}
    for key, value in (raw or {}).items():
        ns, _, name = key.replace("-", "_").rpartition(".")
        if ns and ns not in NAMESPACES:
            raise ValueError(f"parameter {key!r}: unknown namespace {ns!r}; write method.KEY or "
                             "selector.KEY")
        if ns == "selector" and selector is None:
            raise ValueError(f"parameter {key!r}: no --selector is named; the method's own cut "
                             "takes its settings from method parameters")
        if not ns:
            owning = [n for n in NAMESPACES if name in declared[n]]
            if len(owning) > 1:
                raise ValueError(f"parameter {name!r} is declared by both {names[0]} and "
                                 f"{names[1]}; write method.{name} or selector.{name}")
            ns = owning[0] if owning else "method"
        if name not in declared[ns]:
            valid = sorted(declared["method"]) + sorted(f"selector.{k}" for k in declared["selector"])
            raise ValueError(f"unknown {'selector ' if ns == 'selector' else ''}parameter "
                             f"{name!r}; valid: {', '.join(valid) or '(none)'}")
        if name in out[ns]:
            raise ValueError(f"parameter {name!r} is given twice")
        out[ns][name] = value
    return out["method"], out["selector"]
