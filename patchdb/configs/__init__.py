"""Sweep configs shipped with patchdb, and the one rule for what a --config value names."""

from importlib import resources
from pathlib import Path

from patchdb.config import ConfigSeries, SweepConfig, load_series
from patchdb.errors import ConfigError


def packaged_config_names() -> list[str]:
    """Names of the TOML configs in this package ("demo"), so --config accepts them anywhere."""
    folder = resources.files("patchdb.configs")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir()
                  if p.name.endswith(".toml"))


def resolve_config(name_or_path: str | Path | None) -> SweepConfig:
    """A --config value that must define one sweep (a dose series is refused)."""
    return resolve_series(name_or_path).single(f"config {name_or_path}")


def resolve_series(name_or_path: str | Path | None) -> ConfigSeries:
    """A --config value: an existing TOML file, else a packaged config name; None: the default.
    A list for steer_layer or strength makes a series of sweeps (patchdb.config.DOSE_KEYS)."""
    if name_or_path is None:
        return load_series(None)
    if Path(name_or_path).is_file():
        return load_series(name_or_path)
    names = packaged_config_names()
    if str(name_or_path) in names:
        resource = resources.files("patchdb.configs") / f"{name_or_path}.toml"
        with resources.as_file(resource) as p:
            return load_series(p)
    raise ConfigError(f"config file not found: {name_or_path} "
                      f"(packaged configs: {', '.join(names)})")


def config_option_help() -> str:
    """The --config help line, listing the packaged names so a user can see what to type."""
    return (f"Sweep TOML file, or a packaged config: {', '.join(packaged_config_names())} "
            "(env PATCHDB_CONFIG; default: the default sweep of docs/science.md).")
