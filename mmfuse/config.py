"""The one config loader: dataclass defaults < ``--config FILE.yaml`` (repeatable) < ``dotted.key=value``.

Every stage declares a tree of dataclasses (``data_pipeline/config.py``, ...). This module turns argv into an
instance of that tree with OmegaConf structured configs, so unknown keys and wrong types fail before any work
starts, naming the key. Help text is the attribute docstring written under each field::

    @dataclass
    class OutputConfig:
        path: str = MISSING
        \"\"\"Folder or object-store URL the shards are written to.\"\"\"

A stage may define ``validate(self)`` on its root dataclass to check combinations once, at load.

A key that was renamed keeps working for a release: a dataclass lists ``RENAMED = {"old.key": "new.key"}`` (paths
relative to it), and a YAML file or override that uses the old name is read as the new one, with one warning.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import re
import textwrap
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf, StringNode
from omegaconf.errors import OmegaConfBaseException

from mmfuse.schema import MISSING, ConfigError

T = TypeVar("T")

__all__ = ["MISSING", "ConfigError", "load_config", "parse_args", "to_yaml", "to_dict", "help_text"]


CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


def load_config(schema: type[T], files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = (),
                presets: dict[str, str] | None = None) -> T:
    """Build ``schema`` from defaults, then each YAML file in order, then ``key=value`` overrides.

    ``presets`` maps a key naming a preset (``"model.flavor"``) to a file pattern under ``configs/``
    (``"model/{}.yaml"``): the chosen file is merged under the key's parent (``model``) right after the
    defaults, so files and overrides still win over it (``model.flavor=tiny model.image.layers=4``). A file of
    ``files`` written for that parent (a flavor file, ``_mount``) is merged under it, in its place in the order.
    """
    presets = presets or {}
    mounts = {key.rpartition(".")[0]: key for key in presets if "." in key}
    try:
        renames = renamed_keys(OmegaConf.structured(schema))
        merged, mounted = _merge(OmegaConf.structured(schema), files, overrides, mounts, renames)
        for key, pattern in presets.items():
            name = OmegaConf.select(merged, key)
            if not name:
                continue
            path = CONFIG_ROOT / pattern.format(name)
            if not path.is_file() and (key, name) in {(k, n) for _, k, n in mounted}:
                continue  # the user's own flavor file, stacked with --config: it is the preset
            if not path.is_file():
                known = sorted(p.stem for p in path.parent.glob("*.yaml"))
                raise ConfigError(f"{key}={name!r}: no such preset (known: {', '.join(known)})")
            preset = _under(key.rpartition(".")[0], OmegaConf.load(path))
            preset = apply_renames(preset, renames, str(path))
            merged, mounted = _merge(OmegaConf.merge(OmegaConf.structured(schema), preset), files, overrides, mounts,
                                     renames)
        for file, key, name in mounted:
            final = OmegaConf.select(merged, key)
            if name is not None and name != final:
                # The preset merged first would be `final`, the fields the file sets `name`'s: a model of neither.
                raise ConfigError(f"{file} sets {key}={name!r}, but a later file or a key=value override sets "
                                  f"{key}={final!r}: keep one (stack {file} after every file that sets {key})")
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def renamed_keys(node: DictConfig, prefix: str = "") -> dict[str, str]:
    """{old dotted key: new dotted key} for the structured config ``node`` and every dataclass nested in it."""
    renames = {prefix + old: prefix + new for old, new in getattr(OmegaConf.get_type(node), "RENAMED", {}).items()}
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            renames.update(renamed_keys(child, f"{prefix}{key}."))
    return renames


_ABSENT = object()


def apply_renames(cfg: Any, renames: dict[str, str], source: str) -> Any:
    """``cfg`` (a loaded YAML file, a release's config) with each old key moved to its new name, saying so once."""
    if not renames or not isinstance(cfg, DictConfig):
        return cfg
    for old, new in renames.items():
        parent_key, _, leaf = old.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent:
            continue
        if OmegaConf.select(cfg, new, default=_ABSENT) is not _ABSENT:
            raise ConfigError(f"{source} sets both {old} and {new} (the new name of {old}): keep {new}")
        value = parent[leaf]
        del parent[leaf]
        OmegaConf.update(cfg, new, value, merge=True, force_add=True)
        _say_renamed(old, new, source)
    return cfg


def _renamed_override(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key == old or key.startswith(old + "."):
            _say_renamed(old, new, "the command line")
            return new + key[len(old):]
    return key


_SAID: set[tuple[str, str]] = set()


def _say_renamed(old: str, new: str, source: str) -> None:
    from mmfuse.launch import says_warnings

    if (old, source) not in _SAID and says_warnings():
        _SAID.add((old, source))
        import logging

        logging.getLogger("mmfuse.config").warning("%s: config key %r is now %r (the old name works until the next "
                                                   "release)", source, old, new)


def _under(mount: str, cfg: Any) -> Any:
    """``cfg`` nested under the dotted ``mount`` (unchanged for the root, ``""``)."""
    for part in reversed(mount.split(".") if mount else []):
        cfg = OmegaConf.create({part: cfg})
    return cfg


def _mount(base: DictConfig, loaded: Any, mounts: dict[str, str], renames: dict[str, str] | None = None) -> str:
    """Where a ``--config`` file belongs: a preset's parent (``model``) for a file written for it, else the root.

    A flavor file (``configs/model/small.yaml``, or a copy of one anywhere) is written for ``model``: none of its
    top-level keys is a field of the root and some are fields of ``model`` (``flavor``, ``image``, ...). Every
    other file is rooted at the top, so a key out of place in it is named where it stands (``unknown config key
    'image'``); a key ``model`` lacks, in a flavor file, is named under ``model``."""
    if not isinstance(loaded, DictConfig) or not len(loaded):
        return ""
    keys = set(loaded.keys())
    if keys & set(base.keys()):
        return ""
    for mount in mounts:
        node = OmegaConf.select(base, mount)
        old = {key.removeprefix(mount + ".") for key in renames or {} if key.startswith(mount + ".")}
        if isinstance(node, DictConfig) and keys & (set(node.keys()) | old):
            return mount
    return ""


def _merge(merged, files, overrides, mounts: dict[str, str] | None = None, renames: dict[str, str] | None = None):
    """``merged`` with ``files``, then ``overrides``; and, for each file merged under a preset's parent, (file,
    preset key, the preset the file names or None)."""
    mounted = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {file}")
        loaded = OmegaConf.load(path)
        mount = _mount(merged, loaded, mounts or {}, renames)
        if mount:
            key = mounts[mount]
            mounted.append((file, key, OmegaConf.select(loaded, key.rpartition(".")[2])))
        merged = OmegaConf.merge(merged, apply_renames(_under(mount, loaded), renames or {}, file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = _renamed_override(key.strip(), renames or {})
        try:
            override = OmegaConf.from_dotlist([f"{key.strip()}={value}"])
            read = OmegaConf.select(override, key.strip())
            if (isinstance(read, (bool, DictConfig)) or (read is None and not value.strip())) \
                    and _is_string_field(merged, key.strip()):
                # YAML 1.1 reads no/off/yes/on as booleans, `key=` as null and `a: b` as a mapping: a string field
                # takes the text
                override = OmegaConf.create(_nested(key.strip(), value.strip()))
            # run={precision: bf16}: an old name inside a mapping value
            merged = OmegaConf.merge(merged, apply_renames(override, renames or {}, "the command line"))
        except OmegaConfBaseException as err:
            raise ConfigError(_explain(err, key.strip())) from None
        except yaml.YAMLError as err:  # {image_id}.png reads as a YAML mapping followed by text
            items = _plain_list(value)
            if items is None:
                raise ConfigError(f"bad value for config key {key.strip()!r}: {value!r} is not valid YAML "
                                  f"({' '.join(str(err).split()[:6])}...); quote it: \"{key.strip()}='{value}'\"") from None
            try:
                merged = OmegaConf.merge(merged, OmegaConf.create(_nested(key.strip(), items)))
            except (OmegaConfBaseException, TypeError, ValueError) as merge_err:
                raise ConfigError(f"bad value for config key {key.strip()!r}: {value!r} ({merge_err})") from None
    return merged, mounted


def _is_string_field(cfg, dotted: str) -> bool:
    """Whether ``dotted`` names a string field of the schema (set, unset or None)."""
    parent_key, _, leaf = dotted.rpartition(".")
    try:
        parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
        node = parent._get_node(leaf) if isinstance(parent, DictConfig) else None
    except OmegaConfBaseException:
        return False
    return isinstance(node, StringNode)


_LIST_ITEM = re.compile(r"""\s*('[^']*'|"[^"]*"|[^,]*?)\s*(?:,|$)""")


def _plain_list(value: str) -> list[str] | None:
    """``[a photo of a {}., a {}]`` as users type a list of strings (YAML reads ``{}`` as a mapping): its
    comma-separated items, stripped, a quoted item whole (``'a, b'``); None for anything not in brackets."""
    value = value.strip()
    if not (value.startswith("[") and value.endswith("]")):
        return None
    items = [match.group(1) for match in _LIST_ITEM.finditer(value[1:-1]) if match.group(1)]
    return [item[1:-1] if len(item) > 1 and item[0] == item[-1] and item[0] in "'\"" else item for item in items]


def _nested(dotted: str, value: Any) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def parse_args(schema: type[T], argv: list[str] | None, prog: str, description: str = "", positional: str | None = None,
               presets: dict[str, str] | None = None) -> T:
    """Parse ``[--config FILE]... [key=value]...`` (and ``-h``) into ``schema``.

    ``positional`` names the key a bare argument fills (``mmfuse verify DIR`` → ``path=DIR``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    files: list[str] = []
    overrides: list[str] = []
    while argv:
        arg = argv.pop(0)
        if arg in ("-h", "--help"):
            print(help_text(schema, prog, description, positional))
            raise SystemExit(0)
        if arg == "--config":
            if not argv:
                raise ConfigError("--config needs a YAML file")
            files.append(argv.pop(0))
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        elif positional and not arg.startswith("-"):
            overrides.append(f"{positional}={arg}")
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use key=value, --config FILE.yaml or --help")
    return load_config(schema, files, overrides, presets)


def to_dict(config: Any) -> dict:
    """A plain dict of a config dataclass (for JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _explain(err: OmegaConfBaseException, key: str | None = None) -> str:
    key = key or getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    if type(err).__name__ == "ConfigKeyError" or "not in struct" in message.lower():
        return f"unknown config key {key!r}" if key else message
    if type(err).__name__ == "MissingMandatoryValue":
        return f"missing required config key {key!r} (set it with {key}=...)"
    return f"bad value for config key {key!r}: {message}" if key else message


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right under each field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    docs = field_docs(cls)
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name, f.type)
        if dataclasses.is_dataclass(kind):
            rows += _rows(kind, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        shown = "(required)" if default == MISSING else repr(default)
        rows.append((prefix + f.name, shown, docs.get(f.name, "")))
    return rows


def _resolved_types(cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # forward refs that do not resolve: fall back to the raw annotations
        return {}


def help_text(schema: type, prog: str, description: str = "", positional: str | None = None) -> str:
    usage = f"usage: {prog} [--config FILE.yaml]... [key=value]..."
    if positional:
        usage = f"usage: {prog} {positional.upper()} [--config FILE.yaml]... [key=value]..."
    lines = [usage, ""]
    if description:
        lines += [description, ""]
    lines += ["Keys (defaults < --config files < key=value):", ""]
    for key, default, doc in _rows(schema):
        lines.append(f"  {key} = {default}")
        if doc:
            lines += textwrap.wrap(doc, 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
