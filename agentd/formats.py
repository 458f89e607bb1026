"""Writing values so that an agent of an older format can read them (docs/versioning.md).

A field added to a value after the first release says so with `since(N)`:

    parallelism: str = Field(default="auto", json_schema_extra=since(2))

Such a field is left out of the JSON while it holds its default, so what a new
agent writes for an old feature reads the same as what the old agent wrote
(agentd 0.1.0's values refuse unknown fields). A field that holds another value
needs format N to be understood: `needed_format` says which format a value needs,
and the writer either raises the entry's format to it (the log: the leader then
refuses the write until every member supports it) or, where losing the field is
harmless (an inventory report to an older leader), leaves it out with `dump(value,
fmt)`.
"""

from __future__ import annotations

import functools
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

SINCE_KEY = "since_format"
M = TypeVar("M", bound=BaseModel)


def since(fmt: int) -> dict[str, int]:
    """`json_schema_extra` for a field added in state/wire format `fmt`."""
    return {SINCE_KEY: fmt}


def _since(model: type[BaseModel], name: str) -> int:
    extra = model.model_fields[name].json_schema_extra
    return int(extra.get(SINCE_KEY, 1)) if isinstance(extra, dict) else 1


def _is_default(model: type[BaseModel], name: str, value: Any) -> bool:
    return value == model.model_fields[name].get_default(call_default_factory=True)


def dump(value: Any, fmt: int) -> Any:
    """JSON-able data for a reader of format `fmt`: fields newer than `fmt` and new fields at their default
    are left out. Plain values go through pydantic's own JSON conversion."""
    if isinstance(value, BaseModel):
        model = type(value)
        if _newest_since(model) <= fmt:
            # Nothing to leave out for this reader but defaults, which every versioned field's `exclude_if`
            # drops already (tests/test_versioning.py checks that they all have one): pydantic's own dump,
            # 10x faster than the walk below - snapshots of 10,000 deployments go through here.
            return value.model_dump(mode="json")
        out = {}
        for name in model.model_fields:
            v = getattr(value, name)
            s = _since(model, name)
            if s > 1 and (s > fmt or _is_default(model, name, v)):
                continue
            out[name] = dump(v, fmt)
        return out
    if isinstance(value, (list, tuple)):
        return [dump(v, fmt) for v in value]
    if isinstance(value, dict):
        return {str(k): dump(v, fmt) for k, v in value.items()}
    return to_jsonable_python(value)


def needed_format(value: Any) -> int:
    """The oldest format that can read `value` whole: the newest `since` among its fields that are set."""
    if isinstance(value, BaseModel):
        model = type(value)
        if not _has_versioned_fields(model):
            return 1
        need = 1
        for name in model.model_fields:
            v = getattr(value, name)
            s = _since(model, name)
            if s > 1 and not _is_default(model, name, v):
                need = max(need, s)
            need = max(need, needed_format(v))
        return need
    if isinstance(value, (list, tuple)):
        return max((needed_format(v) for v in value), default=1)
    if isinstance(value, dict):
        return max((needed_format(v) for v in value.values()), default=1)
    return 1


@functools.cache
def _newest_since(model: type[BaseModel]) -> int:
    """The newest `since` of `model` and the models it contains (cached: reports call this per host)."""
    return max([1, *(_since(model, n) for n in model.model_fields), *(_newest_since(t) for t in _nested_models(model))])


def _has_versioned_fields(model: type[BaseModel]) -> bool:
    return _newest_since(model) > 1


def _nested_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    out = []
    stack = [f.annotation for f in model.model_fields.values()]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            out.append(t)
        for arg in getattr(t, "__args__", ()) or ():
            stack.append(arg)
    return out


def validate_lenient(model: type[M], text: str | bytes) -> M:
    """`model` from JSON written by a newer agent: fields this version does not know are left out.

    Only for data where losing a field is harmless (a host inventory: placement then ignores what it
    cannot read). The log is never read this way: an entry says which format it needs instead. Anything
    else wrong (a bad type, a missing field, not JSON) raises ValidationError as `model_validate_json` does.
    """
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
        if not unknown:
            raise
        first = exc
    raw = json.loads(text)
    for _ in range(64):  # each round drops every unknown field the last validation named
        for loc in unknown:
            if not _drop(raw, loc):
                raise first
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
            if not unknown:
                raise
    raise first


def _drop(data: Any, loc: tuple[Any, ...]) -> bool:
    for key in loc[:-1]:
        in_dict = isinstance(data, dict) and key in data
        in_list = isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data)
        if in_dict or in_list:
            data = data[key]
        else:
            return False
    if isinstance(data, dict) and loc and loc[-1] in data:
        del data[loc[-1]]
        return True
    return False
