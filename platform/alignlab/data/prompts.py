"""Zero-shot prompt formatting shared by dataset writers and the evaluation suite."""

from __future__ import annotations

import re

# "a" (either case) at the end of the text before the placeholder, as a whole word.
_TRAILING_ARTICLE = re.compile(r"(?:^|(?<=[^A-Za-z]))([aA])(\s+)$")


def format_prompt(template: str, classname: str) -> str:
    """Fill a zero-shot prompt, fixing the article right before the placeholder when the class name
    starts with a vowel letter: ("a photo of a {}.", "orange circle") -> "a photo of an
    orange circle.". The rule is the letter rule of the source, not pronunciation ("an unicorn")."""
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}' placeholder for the class name")
    prefix, suffix = template.split("{}")
    if classname[:1].lower() in tuple("aeiou"):
        prefix = _TRAILING_ARTICLE.sub(lambda m: m.group(1) + "n" + m.group(2), prefix)
    return f"{prefix}{classname}{suffix}"
