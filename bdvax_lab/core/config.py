"""Config dataclasses that round-trip to JSON and YAML.

Every recipe in bdvax_lab (training, attacks, signatures, purification) is a
dataclass deriving from :class:`Config`, so it can be saved beside the artifact
it produced and loaded back to reproduce it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="Config")

#: ``--dtype`` names of the weights (``bdvax_lab.core.models.parse_dtype``; "auto": bf16 on CUDA, fp32 on CPU)
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _from_plain(tp: Any, value: Any) -> Any:
    """Rebuild nested dataclasses / tuples from plain JSON values."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_plain(arg, value)
            except (TypeError, ValueError):
                continue
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp.from_dict(value) if issubclass(tp, Config) else tp(**value)
    if origin in (tuple,) and isinstance(value, list):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_plain(args[0], v) for v in value)
        return tuple(value)
    if origin in (list,) and isinstance(value, list) and args:
        return [_from_plain(args[0], v) for v in value]
    return value


@dataclasses.dataclass
class Config:
    """Base class: ``to_dict``/``from_dict``, JSON and YAML round trips."""

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        kwargs = {k: _from_plain(hints.get(k, Any), v) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    # JSON -----------------------------------------------------------------
    def to_json(self, path: str | Path | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, sort_keys=True)
        if path is not None:
            from .artifacts import atomic_write_text

            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_json(cls: type[T], source: str | Path) -> T:
        text = Path(source).read_text() if _looks_like_path(source) else str(source)
        return cls.from_dict(json.loads(text))

    # files ----------------------------------------------------------------
    @classmethod
    def from_file(cls: type[T], path: str | Path) -> T:
        """Read a config file: YAML for ``.yaml``/``.yml``, JSON otherwise; never inline text.

        A missing file is ``FileNotFoundError``; unreadable bytes, a parse error, a non-mapping or a bad field
        are a ``ValueError``; each message is one line naming the file.
        """
        data = read_mapping(path, cls.__name__)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: {' '.join(str(exc).split())}") from None

    # YAML -----------------------------------------------------------------
    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=True)
        if path is not None:
            from .artifacts import atomic_write_text

            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls: type[T], source: str | Path) -> T:
        import yaml

        text = Path(source).read_text() if _looks_like_path(source) else str(source)
        return cls.from_dict(yaml.safe_load(text))


def read_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping in a config file (YAML for ``.yaml``/``.yml``, JSON otherwise), never inline text.

    A missing file is ``FileNotFoundError``; unreadable bytes, a parse error or a non-mapping are a
    ``ValueError``; each message is one line naming the file (``what``: the fields it should hold).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError, RecursionError
        first = " ".join(str(exc).split())
        raise ValueError(f"{path}: not valid {'YAML' if yaml_file else 'JSON'} ({first})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of {what} fields, got {type(data).__name__}")
    return data


def _looks_like_path(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    s = str(source)
    return "\n" not in s and not s.lstrip().startswith(("{", "[")) and Path(s).exists()
