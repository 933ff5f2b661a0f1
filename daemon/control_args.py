"""The typed arguments of the supervisor's control operations (daemon/control.py): each parses
a Control message's `args` map and refuses a bad one with the code its clients match."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from daemon.errors import InvalidInput
from daemon.repository import NAME_RE

__all__ = ["NoArgs", "RoleArgs", "IndexArgs", "ModelArgs", "LoadArgs", "RegionArgs",
           "RegionNameArgs", "ValidateArgs", "LogLevelArgs", "LOG_LEVELS"]


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class NoArgs:
    @classmethod
    def parse(cls, args: dict[str, Any]) -> NoArgs:
        return cls()


@dataclass(frozen=True, slots=True)
class RoleArgs:
    role: str

    @classmethod
    def parse(cls, args: dict[str, Any]) -> RoleArgs:
        return cls(str(args.get("role")))


@dataclass(frozen=True, slots=True)
class IndexArgs:
    ready: bool = False         # Triton's "ready": only what can serve now

    @classmethod
    def parse(cls, args: dict[str, Any]) -> IndexArgs:
        return cls(bool(args.get("ready")))


@dataclass(frozen=True, slots=True)
class ModelArgs:
    model: str

    @classmethod
    def parse(cls, args: dict[str, Any]) -> ModelArgs:
        return cls(_model_name(args.get("model")))


@dataclass(frozen=True, slots=True)
class LoadArgs:
    model: str
    repository: str | None = None          # a frontend's upload of the model's files
    overrides: Any = None       # model.toml overrides (Triton's config): a map, checked later

    @classmethod
    def parse(cls, args: dict[str, Any]) -> LoadArgs:
        repository = args.get("repository")
        return cls(_model_name(args.get("model")),
                   None if repository is None else str(repository), args.get("overrides"))

    def checked_overrides(self) -> dict[str, Any] | None:
        """The overrides, once the model is known to be in the repository (a missing model is
        a 404 whatever else the request holds)."""
        if self.overrides is not None and not isinstance(self.overrides, dict):
            raise InvalidInput("overrides must be a map", code="bad_message")
        return self.overrides


@dataclass(frozen=True, slots=True)
class RegionArgs:
    name: str
    key: str
    nbytes: int
    offset: int = 0

    @classmethod
    def parse(cls, args: dict[str, Any]) -> RegionArgs:
        name, key = args.get("name"), args.get("key")
        offset, nbytes = args.get("offset", 0), args.get("nbytes")
        if not (isinstance(name, str) and isinstance(key, str) and _int(offset)
                and _int(nbytes)):
            raise InvalidInput("region needs a name, key, offset and byte size",
                               code="shm_bad_region")
        return cls(name, key, nbytes, offset)


@dataclass(frozen=True, slots=True)
class RegionNameArgs:
    name: str | None = None     # None: every region

    @classmethod
    def parse(cls, args: dict[str, Any]) -> RegionNameArgs:
        name = args.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidInput("a region's name is a string", code="shm_bad_region",
                               param="name")
        return cls(name)


@dataclass(frozen=True, slots=True)
class ValidateArgs:
    name: str
    version: int
    path: Path

    @classmethod
    def parse(cls, args: dict[str, Any]) -> ValidateArgs:
        name, version, path = args.get("name"), args.get("version"), args.get("path")
        if not isinstance(name, str) or not _int(version) or not isinstance(path, str):
            raise InvalidInput("validate needs name, version and path", code="bad_message")
        return cls(name, version, Path(path))


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True, slots=True)
class LogLevelArgs:
    level: str | None = None    # None: read the level

    @classmethod
    def parse(cls, args: dict[str, Any]) -> LogLevelArgs:
        level = args.get("level")
        if level is not None and level not in LOG_LEVELS:
            raise InvalidInput(f"log level {level!r} is not one of {list(LOG_LEVELS)}",
                               code="invalid_log_setting", param="level")
        return cls(level)


def _model_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid model name {name!r}", code="invalid_model_name",
                           param="model")
    return name
