"""Named configs: Python files ``experiments/configs/<name>.py`` exposing ``get_config()``.

The directory is ``JAXSPARSE_CONFIG_DIR`` if set, else the one next to the source tree
(editable installs, notebooks in the repo), else the copy a regular install puts under
``<prefix>/share/jaxsparse/configs``. ``get`` also accepts a path to a
``.py`` file of the same shape, so users can keep their own configs outside the repository.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
from pathlib import Path

from jaxsparse.config import Config, ConfigError, validate

DEFAULT = "hydra_tiny"  # what `jaxsparse train` runs with no arguments


def config_dir() -> Path:
    env = os.environ.get("JAXSPARSE_CONFIG_DIR")
    if env:
        return Path(env)
    source_tree = Path(__file__).resolve().parent.parent / "experiments" / "configs"
    installed = Path(sysconfig.get_paths()["data"]) / "share" / "jaxsparse" / "configs"
    return source_tree if source_tree.is_dir() or not installed.is_dir() else installed


def names() -> list[str]:
    """Sorted names of the named configs."""
    directory = config_dir()
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))


def _load_file(path: Path) -> Config:
    spec = importlib.util.spec_from_file_location(f"jaxsparse_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:  # the file's own mistake: where it is, not importlib's frames
        raise ConfigError(f"config file {path}, line {err.lineno}: {err.msg}: "
                          f"{(err.text or '').strip()!r}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not a Config")
    return validate(cfg)


def get(name: str) -> Config:
    """The named config ``name`` (or the config defined by the file at path ``name``)."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {name!r} does not exist")
        return _load_file(path)
    available = names()
    if name not in available:
        raise ConfigError(
            f"unknown config {name!r}; named configs in {config_dir()}: {', '.join(available) or 'none'}"
        )
    return _load_file(config_dir() / f"{name}.py")
