"""The options of a method's config, declared on the config dataclass's own fields.

As flax's ``struct.field(pytree_node=False)`` marks a field's role in its metadata, a config
field becomes a user-facing option when its metadata holds an `Option`: the help text, the
command-line flag, the parser of a typed value and its choices, and optionally how the value
is chosen from the database size n when nobody gives it::

    @dataclasses.dataclass(frozen=True)
    class PowerConfig:
        power: float = option(1.0, "score exponent: <q, x>^power", parse=finite_float)

Nothing else declares a method's options: ``retrieval-jax rank`` lists every registered
method's options (`retrieval_jax.methods.METHODS`) in a group of its own and builds
``method.config_type(**values)`` from what was given, with `resolve` for the rest. Fields
without an `Option` keep their default and stay out of the command line.

Public API:
  * `Option`, `option(default, help, ...)`: the declaration;
  * `config_options(config_type)`: the declared (name, Option, default) triples, in field order;
  * `resolve(config_type, given, n)`: every option's value for a database of n items;
  * `positive_int`, `nonneg_int`, `finite_float`: parsers with a clear message;
  * `add_config_options(parser, configs)`, `given_options(namespace, config_type)`,
    `flag_words(message, config_type)`: the argparse face (one group per config).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import textwrap
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

__all__ = ["Option", "OptionValueError", "add_config_options", "add_option", "config_options", "finite_float",
           "flag_words", "given_options", "nonneg_int", "option", "positive_int", "resolve"]

_KEY = "retrieval_jax.option"


class OptionValueError(argparse.ArgumentTypeError, ValueError):
    """A value a parser refuses; its message is what the user sees (``expected ..., got ...``)."""


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    def parse(text) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise OptionValueError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise OptionValueError(f"expected {what}, got {value}")
        return value
    parse.__name__ = f"int_at_least_{minimum}"
    return parse


#: "12" -> 12; refuses 0, negatives and non-integers.
positive_int = _int_at_least(1, "a positive integer")
#: "0" -> 0; refuses negatives and non-integers.
nonneg_int = _int_at_least(0, "an integer >= 0")


def finite_float(text) -> float:
    """"0.5" -> 0.5; refuses text that is no number, NaN and infinities."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise OptionValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise OptionValueError(f"expected a finite number, got {text!r}")
    return value


class Option(NamedTuple):
    """How a config field is given by a user.

    Attributes:
      help: one line on what the value does (the command line adds its default).
      flag: the command-line flag; by default ``--`` and the field's name with ``-`` for ``_``.
        Methods may share a flag (the graph methods share ``--k``): it is then parsed once,
        so the declarations must agree on ``parse`` and ``choices``.
      parse: text -> value (`positive_int`, `finite_float`, ...); by default from the type
        of the field's default (bool: a ``--flag / --no-flag`` pair).
      choices: the accepted values, or a function returning them (read when the command
        line is built, so a registry that grows is seen).
      choose: ``choose(n, values) -> value`` when the option is not given: the value for a
        database of n items; ``values`` maps the config's other options to their values
        (given, default or chosen). The command line says which values it chose and why (``rule``).
      rule: the choice in words, e.g. ``"min(10, k)"``.
      warn: ``warn(value, n) -> str | None``: a sentence when a given value is legal but
        doubtful for n items (the command line prints it as a warning).
    """

    help: str
    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple | Callable[[], tuple] | None = None
    choose: Callable[[int, Mapping], Any] | None = None
    rule: str = ""
    warn: Callable[[Any, int], str | None] | None = None


def option(default, help: str | Option, **kwargs) -> Any:
    """A dataclass field with ``default`` that is an option (an `Option` in its metadata).

    ``help`` is the help text, or a whole `Option` to share between configs (the graph
    methods' ``k``); ``kwargs`` are the other `Option` attributes (they replace those of a
    shared one).
    """
    spec = help._replace(**kwargs) if isinstance(help, Option) else Option(help, **kwargs)
    return dataclasses.field(default=default, metadata={_KEY: spec})


def _flag(name: str, spec: Option) -> str:
    return spec.flag or "--" + name.replace("_", "-")


def config_options(config_type) -> list[tuple[str, Option, Any]]:
    """(field name, `Option` with its flag filled in, default) of each option of a config class,
    in field order (the default of a field without one is None); [] for None or a config
    without options."""
    if config_type is None:
        return []
    if not dataclasses.is_dataclass(config_type):
        raise TypeError(f"a method's config_type must be a dataclass, got {config_type!r}")
    out = []
    for f in dataclasses.fields(config_type):
        spec = f.metadata.get(_KEY)
        if spec is not None:
            default = f.default
            if default is dataclasses.MISSING:
                default = None if f.default_factory is dataclasses.MISSING else f.default_factory()
            out.append((f.name, spec._replace(flag=_flag(f.name, spec)), default))
    return out


def resolve(config_type, given: Mapping[str, Any], n: int) -> tuple[dict, list[tuple[str, Any, str]]]:
    """Every option's value for a database of n items: ``given``, else chosen (``choose``),
    else the field's default.

    A chosen value may depend on others (``query_k`` on ``k``): they are resolved first,
    whatever their field order. Returns (values by field name, [(name, value, rule)] of the
    values chosen here, None ones left out).
    """
    specs = {name: (spec, default) for name, spec, default in config_options(config_type)}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise ValueError(f"{config_type.__name__} has no option {', '.join(unknown)}")
    values: dict[str, Any] = {}
    chosen: list[tuple[str, Any, str]] = []
    pending: list[str] = []

    class _Lazy(Mapping):
        def __getitem__(self, name):
            return get(name)

        def __iter__(self):
            return iter(specs)

        def __len__(self):
            return len(specs)

    def get(name):
        if name in values:
            return values[name]
        if name not in specs:
            raise KeyError(f"{config_type.__name__} has no option {name!r}")
        spec, default = specs[name]
        if name in given:
            values[name] = given[name]
        elif spec.choose is None:
            values[name] = default
        else:
            if name in pending:
                raise ValueError(f"the chosen options of {config_type.__name__} depend on each other: "
                                 f"{' -> '.join(pending + [name])}")
            pending.append(name)
            values[name] = spec.choose(n, _Lazy())
            pending.remove(name)
            if values[name] is not None:
                chosen.append((name, values[name], spec.rule))
        return values[name]

    for name in specs:
        get(name)
    return values, chosen


# ----------------------------------------------------------------------------- command line
def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _shown_default(default) -> str:
    return "" if default is None or default is False else f" (default: {default})"


def add_option(group, spec: Option, default, *, flag: str | None = None, dest: str | None = None,
               suppress: bool = False) -> None:
    """``spec`` as an argument of an argparse parser or group, its default said in the help.

    ``flag`` replaces ``spec.flag``; ``suppress``: a value not given stays out of the
    namespace (`given_options` then tells what the user gave).
    """
    flag = flag or spec.flag
    text = spec.help if "default" in spec.help else spec.help + _shown_default(default)
    kwargs = dict(dest=dest or _dest(flag), help=text.replace("%", "%%"),
                  default=argparse.SUPPRESS if suppress else default)
    if spec.parse is None and isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = spec.parse or (str if default is None else type(default))
        choices = spec.choices() if callable(spec.choices) else spec.choices
        if choices is not None:
            kwargs["choices"] = tuple(choices)
    group.add_argument(flag, **kwargs)


def add_config_options(parser: argparse.ArgumentParser, configs: Mapping[str, Any]) -> None:
    """The options of several config classes on one parser, an argument group each (titled by
    its key in ``configs``), the default of each config said in its group.

    A value chosen from n (``choose``) shows no default. A flag several configs declare is
    parsed once: it is listed in the first group and named in the others' description
    (with their help or default when it differs), and the declarations must agree on
    ``parse`` and ``choices`` (else TypeError). Nothing is set when an option is not given:
    `given_options` reads what was, `resolve` completes it for the config chosen.
    """
    first: dict[str, tuple[Option, Any]] = {}
    for title, config_type in configs.items():
        specs = config_options(config_type)
        if not specs:
            continue
        group = parser.add_argument_group(title)
        also = []
        for name, spec, default in specs:
            default = None if spec.choose else default
            if spec.flag not in first:
                first[spec.flag] = spec, default
                add_option(group, spec, default, suppress=True)
                continue
            other, other_default = first[spec.flag]
            if (spec.parse, spec.choices) != (other.parse, other.choices):
                raise TypeError(f"{spec.flag} is declared by several methods with different parsers or "
                                f"choices; give {config_type.__name__}.{name} a flag of its own")
            entry = spec.flag if spec.help == other.help else f"{spec.flag}: {spec.help}"
            if default != other_default and "default" not in spec.help:
                entry += _shown_default(default)
            also.append(entry)
        if also:
            group.description = "\n".join(textwrap.wrap("also " + "; ".join(also) + " (listed above)",
                                                         width=86, subsequent_indent="  "))


def given_options(namespace: argparse.Namespace, config_type) -> dict[str, Any]:
    """{field name: value} of the options of ``config_type`` given on a command line parsed
    with `add_config_options`."""
    return {name: getattr(namespace, _dest(spec.flag)) for name, spec, _ in config_options(config_type)
            if hasattr(namespace, _dest(spec.flag))}


def flag_words(text: str, config_type) -> str:
    """A library message with the Python names of ``config_type``'s options replaced by their
    flags: "query_k = 11 exceeds" -> "--query-k 11 exceeds", "AlphaQEConfig.n" -> "--qe-n"."""
    for name, spec, _ in config_options(config_type):
        field = rf"(?<![\w.-])(?:{config_type.__name__}\.)?{name}"
        text = re.sub(rf"{field} = (\S+) exceeds", rf"{spec.flag} \1 exceeds", text)
        text = re.sub(rf"\b{config_type.__name__}\.{name}\b", spec.flag, text)
        text = re.sub(rf"(?<![\w.-]){name}(?= = | <= )", spec.flag, text)
    return text
