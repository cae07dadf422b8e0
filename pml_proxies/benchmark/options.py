"""Command-line options derived from dataclass fields: one way for every command.

A settings dataclass (:class:`~pml_proxies.benchmark.config.BenchmarkConfig`, the tuner's
:class:`~pml_proxies.benchmark.tune.options.TuneArgs`, ...) declares each field with
:func:`option`: its help text, option group, parser, checks and whether it is part of the
protocol live in the field's ``metadata``. :func:`add_options` turns the fields into argparse
options, :func:`given_values` reads back what was typed, :func:`check_fields` runs the fields'
checks. Nothing here imports torch (``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, NoReturn

#: a field's check: ``check(name, value)`` raises ``TypeError`` / ``ValueError`` on a bad value;
#: the message may start with the field's name or option, which is left out when it is shown
Check = Callable[[str, Any], Any]


class ConfigError(ValueError):
    """An invalid setting; ``field`` is the settings field (e.g. of
    :class:`~pml_proxies.benchmark.config.BenchmarkConfig`) it concerns."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage error is two lines, ``<prog>: error: <message>`` and
    ``see '<prog> --help'`` (not the whole usage block), exit code 2. Every command's parser
    is one."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help'\n")


def option(
    default: Any,
    help: str,
    group: str = "general",
    *,
    check: Check | None = None,
    protocol: bool = True,
    cli: bool = True,
    flag: str | tuple[str, ...] | None = None,
    type: Callable[[str], Any] | None = None,
    choices: Collection[Any] | None = None,
    action: str | builtins.type[argparse.Action] | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    convert: Callable[[Any], Any] | None = None,
    cli_default: Any = None,
) -> Any:
    """A settings field with everything about it in its ``metadata``.

    Args:
        default: the field's default (a list or dict is copied for each instance).
        help: the option's help text; ``(default: ...)`` is appended (``argparse.SUPPRESS``:
            a hidden option).
        group: option group in ``--help`` (``"general"``: the parser's own options).
        check: ``check(name, value)``, run by :func:`check_fields`.
        protocol: whether the value changes results (part of the protocol and of the runs'
            fingerprints); ``False`` for execution and report settings.
        cli: ``False``: not an option.
        flag: the option's name, or names (the first names it in errors); default
            ``--field-name``.
        type, choices, action, metavar: passed to ``add_argument``; ``action`` defaults to
            ``store_true`` for a field whose default is ``False``.
        default_text: how ``--help`` describes the default (else the default itself).
        convert: turns the parsed value into the field's (e.g. repeated ``KEY=VALUE`` into a
            dict); may raise :class:`ConfigError`.
        cli_default: the option's value when it is not given (through ``convert``), where the
            command line's default differs from the field's (``None``: none).
    """
    given = dict(check=check, flag=flag, type=type, choices=choices, action=action,
                 metavar=metavar, default_text=default_text, convert=convert,
                 cli_default=cli_default)  # fmt: skip
    meta = {"help": help, "group": group, "protocol": protocol, "cli": cli}
    meta.update({k: v for k, v in given.items() if v is not None})
    if isinstance(default, (list, dict)):
        copy = builtins.type(default)  # ``type`` is the option's parser here
        return dataclasses.field(default_factory=lambda: copy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    """The default value of field ``f``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"field {f.name} has no default")


def option_fields(cls: Any, only: Collection[str] | None = None) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that are options (``only``: those named)."""
    return [
        f
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", False) and (only is None or f.name in only)
    ]


def flags_of(f: dataclasses.Field) -> tuple[str, ...]:
    """The option names of field ``f`` (``--field-name`` unless its metadata names them)."""
    return _flags(f.name, f.metadata)


def _flags(name: str, meta: Mapping[str, Any]) -> tuple[str, ...]:
    flag = meta.get("flag", "--" + name.replace("_", "-"))
    return (flag,) if isinstance(flag, str) else tuple(flag)


def non_protocol_fields(cls: Any) -> tuple[str, ...]:
    """The fields of ``cls`` whose metadata says they do not change results."""
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("protocol", True))


def _help_text(meta: Mapping[str, Any], default: Any) -> str:
    """The ``--help`` text of an option: its help and ``(default: ...)`` (``%`` escaped)."""
    if meta["help"] == argparse.SUPPRESS:
        return argparse.SUPPRESS
    text = meta.get("default_text")
    if text is None:
        text = "no" if default is False else ("yes" if default is True else default)
    return f"{meta['help']} (default: {text})".replace("%", "%%")


def add_options(
    parser: argparse.ArgumentParser,
    cls: Any,
    *,
    only: Collection[str] | None = None,
    changes: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add an option for each option field of dataclass ``cls`` to ``parser``, in the field's
    group (``"general"``: ``parser``'s own options; else an argument group of that title).

    An option not typed is absent from the parsed namespace (``argparse.SUPPRESS``), so that
    :func:`given_values` tells what was typed; a field's ``cli_default`` is the exception.
    ``only`` selects fields by name; ``changes[name]`` updates a field's metadata
    for this parser (e.g. another flag, help or ``cli_default``).
    """
    groups: dict[str, Any] = {"general": parser}
    for f in option_fields(cls, only):
        meta = {**f.metadata, **(changes or {}).get(f.name, {})}
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        default = meta.get("cli_default", field_default(f))
        kw: dict[str, Any] = {
            "dest": f.name,
            "default": meta.get("cli_default", argparse.SUPPRESS),
            "help": _help_text(meta, default),
            "action": meta.get("action", "store_true" if default is False else "store"),
        }
        kw.update({key: meta[key] for key in ("type", "choices", "metavar") if key in meta})
        groups[meta["group"]].add_argument(*_flags(f.name, meta), **kw)


def given_values(args: argparse.Namespace, cls: Any) -> dict[str, Any]:
    """The values of ``cls``'s option fields in parsed ``args`` (those typed, and those with a
    ``cli_default``), each through its field's ``convert`` (which may raise
    :class:`ConfigError`)."""
    values = {}
    for f in option_fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            convert = f.metadata.get("convert")
            values[f.name] = convert(value) if convert is not None else value
    return values


def check_fields(settings: Any) -> None:
    """Run the check of each field of dataclass instance ``settings``.

    Raises:
        ConfigError: naming the first field whose check failed (the check's message, less a
            leading field name or option name).
    """
    for f in dataclasses.fields(settings):
        check = f.metadata.get("check")
        if check is None:
            continue
        try:
            check(f.name, getattr(settings, f.name))
        except (TypeError, ValueError) as e:
            message = str(e)
            for prefix in (f.name, *flags_of(f)):
                if message.startswith(prefix + " "):
                    message = message[len(prefix) + 1 :]
                    break
            raise ConfigError(f.name, message) from None


def option_name(
    field_name: str, *classes: Any, changes: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """The option (first flag) of field ``field_name`` of one of ``classes`` (with the
    ``changes`` given to :func:`add_options`), else the name itself."""
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name == field_name:
                return _flags(f.name, {**f.metadata, **(changes or {}).get(f.name, {})})[0]
    return field_name
