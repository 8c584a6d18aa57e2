"""Sweep configs shipped with patchdb, and the one rule for what a --config value names."""

from importlib import resources
from pathlib import Path

from patchdb.config import SweepConfig, load_config
from patchdb.errors import ConfigError


def packaged_config_names() -> list[str]:
    """Names of the TOML configs in this package ("demo"), so --config accepts them anywhere."""
    folder = resources.files("patchdb.configs")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir()
                  if p.name.endswith(".toml"))


def resolve_config(name_or_path: str | Path | None) -> SweepConfig:
    """A --config value: an existing TOML file, else a packaged config name; None: the default."""
    if name_or_path is None:
        return load_config(None)
    if Path(name_or_path).is_file():
        return load_config(name_or_path)
    names = packaged_config_names()
    if str(name_or_path) in names:
        resource = resources.files("patchdb.configs") / f"{name_or_path}.toml"
        with resources.as_file(resource) as p:
            return load_config(p)
    raise ConfigError(f"config file not found: {name_or_path} "
                      f"(packaged configs: {', '.join(names)})")


def config_option_help() -> str:
    """The --config help line, listing the packaged names so a user can see what to type."""
    return (f"Sweep TOML file, or a packaged config: {', '.join(packaged_config_names())} "
            "(env PATCHDB_CONFIG; default: the default sweep of docs/science.md).")
