"""YAML as YAML 1.2 reads it, for every config, spec, settings file and `key=value` override.

PyYAML implements YAML 1.1, where `off`, `on`, `yes`, `no` are booleans, `1e-4` is a string (1.1 floats
need a dot), `0777` is octal, `1_000` is an int and `2024-01-01` is a date; and a key given twice silently
keeps the last value. Researchers write `distill.concepts.targets=off` and `lr: 1e-4`, so the loader here
uses the YAML 1.2 core schema instead:

  null   ~ null Null NULL (and an empty value)
  bool   true True TRUE false False FALSE          (off/on/yes/no stay strings)
  int    [-+]?[0-9]+   0o[0-7]+   0x[0-9a-fA-F]+
  float  [-+]?(.[0-9]+ | [0-9]+(.[0-9]*)?)([eE][-+]?[0-9]+)?   [-+]?.inf   .nan   (1e-4, 1e4, 3.0e-4)

and a duplicate key in a mapping is an error naming the key and both lines. `dump_yaml` quotes every string
that either YAML version would read as something else, so what it writes reads back the same in both.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_MERGE = re.compile(r"^(?:<<)$")
_DIGITS = list("-+0123456789")


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names the same key twice (YAML 1.2 forbids it; PyYAML keeps the last one silently)."""


class Yaml12Loader(yaml.SafeLoader):
    """yaml.SafeLoader with the YAML 1.2 core schema's implicit types and duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first_seen.get(key)
                except TypeError:  # an unhashable key: SafeConstructor reports it
                    continue
                if earlier is not None:
                    raise DuplicateKeyError(None, None, f"duplicate key {key!r} (first at line {earlier.line + 1}); "
                                            "keep one of them", key_node.start_mark)
                first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: Yaml12Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)


def _construct_float(loader: Yaml12Loader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


Yaml12Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in [("bool", _BOOL, list("tTfF")), ("int", _INT, _DIGITS),
                               ("float", _FLOAT, _DIGITS + ["."]), ("null", _NULL, ["~", "n", "N", ""]),
                               ("merge", _MERGE, ["<"])]:
    Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", _pattern, _first)
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class Yaml12Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings YAML 1.2 would read as numbers (`'1e-4'`, `'0o17'`)."""


Yaml12Dumper.add_implicit_resolver("tag:yaml.org,2002:int", _INT, _DIGITS)
Yaml12Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, _DIGITS + ["."])


def load_yaml_text(text: str) -> Any:
    """Parse one YAML document with the YAML 1.2 core schema (None for an empty document)."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def dump_yaml(data: Any) -> str:
    """YAML text of `data` (block style, key order kept) that reads back the same in YAML 1.1 and 1.2."""
    return yaml.dump(data, Dumper=Yaml12Dumper, sort_keys=False)


def describe_yaml_error(err: yaml.YAMLError) -> str:
    """One line for a YAML error: `line L, column C: problem (context)`, without PyYAML's multi-line excerpt."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = err.problem or err.context or "invalid YAML"
        context = f" ({err.context})" if err.context and err.problem else ""
        return f"{where}{what}{context}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__
