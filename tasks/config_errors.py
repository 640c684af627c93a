"""A cluster file's problems for the user: `ConfigError`, one line per problem naming the file
and the YAML path, and the translation of pydantic's validation errors into such lines (with a
"did you mean" for a misspelled key).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel


class ConfigError(Exception):
    """A cluster file that cannot be used; str() is the message shown to the user."""

    def __init__(self, file: Path | str, problems: list[tuple[str, str]]):
        self.file = str(file)
        self.problems = problems
        lines = [f"{self.file}: {where}: {what}" if where else f"{self.file}: {what}"
                 for where, what in problems]
        super().__init__("\n".join(lines))



def yaml_path(loc: tuple[Any, ...]) -> str:
    """('nodes', 2, 'address') -> 'nodes[2].address'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def describe(err: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    """One pydantic error of validating `model` -> (YAML path, message for the user)."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    where = yaml_path(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
        return where, f"unknown key {loc[-1]!r}{hint}"
    if kind == "missing":
        return where, "required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        msg = f"wrong type: {msg} (got {type(err['input']).__name__} {err['input']!r})"
    return where, msg


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the model accepts at `loc` (for 'did you mean')."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field else None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / list[X] / Annotated[X, ...] -> X."""
    while get_origin(annotation) is not None:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) is Annotated:
            args = args[:1]
        if not args:
            return None
        annotation = args[0]
    if hasattr(annotation, "__args__") and type(None) in getattr(annotation, "__args__", ()):
        annotation = next(a for a in annotation.__args__ if a is not type(None))
    return annotation
