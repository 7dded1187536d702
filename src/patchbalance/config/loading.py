"""What every configuration file shares: strict sections, YAML reading, one-line errors.

`StrictModel` is the base of every section (unknown keys are errors, upstream synonyms are
renamed); `load_model_file` and `model_from_mapping` read and validate one block of a file or a
mapping, turning every mistake into a `ConfigError` that names the file and the key.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from patchbalance.config.secrets import (
    is_secret_key,
    mask_override,
    mask_secrets,
    mask_text,
    safe_cause,
)
from patchbalance.errors import ConfigError

# A random seed: numpy, scikit-learn and torch all take 0 ... 2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors; `synonyms` maps upstream names to ours."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)
    synonyms: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _rename_synonyms(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.synonyms:
            return data
        data = dict(data)
        for old, new in cls.synonyms.items():
            if old not in data:
                continue
            value = data.pop(old)
            if new in data and data[new] != value:
                if value is not None and data[new] is not None:
                    raise ValueError(f"give either '{old}' or its synonym '{new}', not both")
                # `geojson_path: null` over a file's `footprints_path` (or the reverse) unsets it.
                value = None
            data[new] = value
        return data


def mark_resolved(config: BaseModel) -> None:
    """Record that `config`'s paths are resolved and its files checked, as it stands now.

    The model must declare `_resolved_as: str | None = PrivateAttr(default=None)`.
    """
    config._resolved_as = config.model_dump_json()  # type: ignore[attr-defined]


def is_resolved(config: BaseModel) -> bool:
    """Return True when `config` is unchanged since `mark_resolved`: a command resolves its
    configuration once, and the API resolves again only one that was built or changed since."""
    recorded = getattr(config, "_resolved_as", None)
    return recorded is not None and recorded == config.model_dump_json()


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in a YAML file gives the same key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Plain PyYAML keeps the last value silently: two arms named `a1` would become one.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: PyYAML's own check reports it
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise DuplicateKeyError(
                    f"duplicate key '{key}' at line {line} (first given at line {seen}); "
                    "a mapping holds each key once: remove or rename one"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the YAML file at `path` as a plain mapping; `${...}` interpolations are left as text.

    Every YAML file the tool reads is read here. Raises `ConfigError` for a missing file, a
    YAML syntax error (with line and column), a key given twice in one mapping (with its line)
    or a non-mapping document. Interpolations are resolved later, after `--set` overrides.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the YAML configuration file in it")
    if not path.is_file():
        raise ConfigError(f"{path}: configuration file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the file must hold a mapping of keys, not a {type(raw).__name__}"
        )
    return raw


def _apply_overrides(
    block: dict[str, Any], overrides: list[str], block_name: str, path: Path
) -> dict[str, Any]:
    conf = create_config(block, path)
    for item in overrides:
        shown = mask_override(item)
        if "=" not in item:
            raise ConfigError(f"--set {shown!r}: expected key.path=value, e.g. clustering.k_max=8")
        key, text = (part.strip() for part in item.split("=", 1))
        if key.startswith(block_name + "."):
            key = key[len(block_name) + 1 :]
        _check_override_key(OmegaConf.to_container(conf), key, shown, path)
        try:
            # Parsed as OmegaConf parses a dotlist value (numbers, lists, `${...}` kept).
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
            # Key by key, so that a number in the path indexes a list: input.rasters.0.image_path.
            OmegaConf.update(conf, key, value, merge=True)
        except OmegaConfBaseException as exc:
            exc.full_key = key  # the key the user set, not OmegaConf's scratch name
            message = omegaconf_message(exc, f"{path}: --set {shown!r}")
            raise ConfigError(message) from safe_cause(exc)
    return _resolve(conf, path)


def _check_override_key(block: Any, key: str, item: str, path: Path) -> None:
    """Raise `ConfigError` unless every part of `key` names a key, or a list item by index."""
    node = block
    for depth, part in enumerate(key.split(".")):
        if not part:
            raise ConfigError(
                f"{path}: --set {item!r}: the key has an empty part; write key.path=value"
            )
        if isinstance(node, list):
            where = ".".join(key.split(".")[:depth])
            if not part.isdigit() or int(part) >= len(node):
                fix = f"index it with 0 to {len(node) - 1}" if node else "it has no item to set"
                raise ConfigError(
                    f"{path}: --set {item!r}: '{where}' is a list of {len(node)} item(s); {fix}"
                )
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return


# OmegaConf's reasons that quote nothing of the value: safe to show even for a secret key.
_SAFE_REASON = re.compile(r"Environment variable '[^']*' not found")


def omegaconf_message(exc: OmegaConfBaseException, where: str | Path) -> str:
    """Return one line for an OmegaConf error: where, the key that holds the `${...}`, and why.

    The reason is OmegaConf's first line, secrets masked; for a secret key (`password`, `dsn`)
    it is left out unless it quotes nothing of the value, since a malformed `${` in a password
    is quoted back by OmegaConf.
    """
    key = str(getattr(exc, "full_key", None) or "")
    first = str(exc).splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
    found = _SAFE_REASON.search(first)
    if is_secret_key(key) and found is None:
        reason = "its value is not shown, as it is a secret"
    else:
        reason = found.group(0) if found else mask_text(first)
    where_key = f"{where}: '{key}'" if key else f"{where}"
    if isinstance(exc, GrammarParseError):
        return (
            f"{where_key} holds a '${{' that starts no valid interpolation ({reason}); "
            "write ${name} or ${oc.env:VAR}, or \\${ for a literal ${"
        )
    return f"{where_key}: cannot resolve an interpolation: {reason}"


def create_config(data: Any, where: str | Path) -> Any:
    """Return `data` as an OmegaConf object, or raise `ConfigError` naming the malformed key."""
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_message(exc, where)) from safe_cause(exc)


def _resolve(conf: Any, path: Path | str) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(omegaconf_message(exc, path)) from safe_cause(exc)


def _block(raw: dict[str, Any], name: str) -> dict[str, Any]:
    if name in raw:
        block = raw[name]
        if not isinstance(block, dict):
            raise ConfigError(f"'{name}' must be a mapping of keys")
        return block
    return raw


def _known_keys(model: type[BaseModel]) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(field.alias or name)
    keys.extend(getattr(model, "synonyms", {}).keys())
    # A block whose other keys belong to plug-ins (the methods' parameters of `weights:`).
    extra_keys = getattr(model, "extra_keys", None)
    if callable(extra_keys):
        keys.extend(extra_keys())
    return keys


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            for name, candidate in current.model_fields.items():
                if candidate.alias == part:
                    field = current.model_fields[name]
                    break
        if field is None:
            return None
        current = _submodel(field.annotation)
    return current


def _as_written(model: type[BaseModel], data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Return `loc` in the keys the user wrote in `data`: a synonym as written (`geojson_path`),
    and without the tags pydantic adds for the members of a union (`prior_correction.float`)."""
    shown: list[Any] = []
    node, current = data, model
    for part in loc:
        if isinstance(part, int) or node is None:
            shown.append(part)
            node = node[part] if isinstance(node, list) and isinstance(part, int) else None
            continue
        if not isinstance(node, dict):
            continue  # a union member's tag inside a value, not a key
        key = part
        if part not in node and current is not None:
            synonyms = getattr(current, "synonyms", {})
            key = next((old for old, new in synonyms.items() if new == part and old in node), part)
        shown.append(key)
        node = node.get(key)
        current = _model_at(current, (part,)) if current is not None else None
    return tuple(shown)


def describe_validation_error(
    exc: ValidationError,
    model: type[BaseModel],
    path: Path | str,
    prefix: str = "",
    data: Any = None,
) -> str:
    """Return one line that explains the first error of `exc` in terms of the YAML keys.

    With `data` (the mapping that was validated), keys are named as the user wrote them.
    """
    errors = exc.errors()
    raw_locs = [
        tuple(part for part in error["loc"] if not str(part).startswith("function-"))
        for error in errors
    ]
    locs = raw_locs if data is None else [_as_written(model, data, loc) for loc in raw_locs]
    error, loc = errors[0], locs[0]
    dotted = ".".join(str(part) for part in loc)
    if prefix:
        dotted = f"{prefix}.{dotted}" if dotted else prefix
    more = len(set(locs)) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    if error["type"] == "extra_forbidden":
        parent = _model_at(model, raw_locs[0][:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(str(loc[-1]), _known_keys(parent), n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean '{close[0]}'?"
            else:
                hint = f"; valid keys here: {', '.join(sorted(_known_keys(parent)))}"
        return f"{path}: unknown key '{dotted}'{hint}{tail}"
    if error["type"] == "missing":
        return f"{path}: missing required key '{dotted}'{tail}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    where = f"'{dotted}': " if dotted else ""
    got = ""
    secret = any(is_secret_key(part) for part in loc if isinstance(part, str))
    if error["type"] not in ("value_error", "assertion_error") and "input" in error and not secret:
        shown = repr(mask_secrets(error["input"]))
        if len(shown) <= 60:
            got = f" (got {shown})"
    return f"{path}: {where}{message}{got}{tail}"


def _validate(model: type[BaseModel], data: dict[str, Any], path: Path, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message = describe_validation_error(exc, model, path, prefix, data)
        raise ConfigError(message) from safe_cause(exc)


def load_model_file(
    model: type[StrictModel], block_name: str, path: str | os.PathLike[str], overrides: list[str]
) -> Any:
    """Return the `model` read from block `block_name` of the YAML file `path`, validated.

    Args:
        model: the section class; it keeps the file's folder as its base folder.
        block_name: the top-level key that may hold the block (else the file is the block).
        path: the YAML file.
        overrides: `key.path=value` strings applied on top (the CLI's `--set`).

    Returns:
        The validated model, its `_base_dir` the file's folder and `_source_path` the file.
    """
    path = Path(path)
    block = _block(read_yaml_mapping(path), block_name)
    config = _validate(model, _apply_overrides(block, overrides, block_name, path), path, "")
    config._base_dir = path.resolve().parent
    config._source_path = path
    return config


def model_from_mapping(
    model: type[StrictModel], block_name: str, data: dict[str, Any], base_dir: Any
) -> Any:
    """Return the `model` built from `data` (or its `block_name` block), validated.

    Args:
        model: the section class.
        block_name: the key that may hold the block (else `data` is the block).
        data: the mapping; `${...}` interpolations are resolved.
        base_dir: the folder relative paths are relative to (None: the current folder).

    Returns:
        The validated model, its `_base_dir` set from `base_dir`.
    """
    resolved = _resolve(create_config(_block(dict(data), block_name), "<config>"), "<config>")
    config = _validate(model, resolved, Path("<config>"), "")
    config._base_dir = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    return config
