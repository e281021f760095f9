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
import traceback
from pathlib import Path

from jaxsparse.config import Config, ConfigError, apply_overrides, validate

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


def _where(path: Path, err: BaseException) -> str:
    """``config file PATH, line N`` of the innermost frame of ``err`` in the file itself."""
    lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__)
             if Path(frame.filename) == path]
    return f"config file {path}" + (f", line {lines[-1]}" if lines else "")


def _load_file(path: Path, overrides) -> Config:
    """The config of the file at ``path`` with ``overrides`` applied, validated once; any
    mistake in it (a syntax error, an exception in its code, a missing ``get_config``, a value
    ``validate`` refuses) is a ConfigError naming the file. Validated after the overrides: a
    file's value that an override replaces is neither refused nor warned about (it is not
    what runs)."""
    spec = importlib.util.spec_from_file_location(f"jaxsparse_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:  # the file's own mistake: where it is, not importlib's frames
        raise ConfigError(f"config file {path}, line {err.lineno}: {err.msg}: "
                          f"{(err.text or '').strip()!r}") from None
    except Exception as err:  # e.g. an import or a name that fails when the file runs
        raise ConfigError(f"{_where(path, err)}: {type(err).__name__}: {err}") from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    try:
        cfg = module.get_config()
    except Exception as err:
        raise ConfigError(f"{_where(path, err)}: get_config() raised {type(err).__name__}: "
                          f"{err}.{_suggestion(err)}") from err
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not a Config")
    overrides = list(overrides)
    cfg = apply_overrides(cfg, overrides)  # a bad override names itself
    try:
        return validate(cfg)
    except ConfigError as err:  # the file's value or an override's: say which were applied
        where = f"config file {path}" + (f" with overrides {overrides}" if overrides else "")
        raise ConfigError(f"{where}: {err}") from None


def _suggestion(err: Exception) -> str:
    """`` Did you mean d_model?`` for a config built with a misspelled keyword
    (``ModelConfig(dmodel=64)``), as ``--set`` suggests for its keys."""
    import dataclasses
    import re

    from jaxsparse.config import SECTIONS, did_you_mean

    found = re.search(r"^(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'",
                      str(err)) if isinstance(err, TypeError) else None
    classes = {cls.__name__: cls for cls in [Config] + [type(getattr(Config(), section))
                                                        for section in SECTIONS]}
    cls = classes.get(found.group(1)) if found else None
    if cls is None:
        return ""
    return did_you_mean(found.group(2), [f.name for f in dataclasses.fields(cls)])


def get(name: str, overrides=()) -> Config:
    """The named config ``name`` (or the config defined by the file at path ``name``), with
    the ``section.key=value`` strings ``overrides`` applied, validated."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file {name!r} does not exist")
        return _load_file(path, overrides)
    available = names()
    if name not in available:
        raise ConfigError(
            f"unknown config {name!r}; named configs in {config_dir()}: {', '.join(available) or 'none'}"
        )
    return _load_file(config_dir() / f"{name}.py", overrides)
