"""Which modules of a model a target names: the pattern language.

A target is a module-name pattern: a suffix of whole dotted components (`"to_q"` matches
`"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"`), a glob when it holds
`*`, `?` or `[` (`"*.attn1.to_[qkv]"`, matched against the whole name), or a regular
expression with the prefix `"re:"` (matched as `re.fullmatch` matches it against the
whole name, in time linear in the name's length: `lowrank._regex`). `targets` is
one such string (comma-separated patterns allowed unless it is a `re:` pattern), a list
of them, or a per-pattern dict of settings:
`{"to_q": {"r": 8, "scale": 1.0, "trainable_scale": false, "hard": false}}`, whose
settings `lowrank.nn.AdapterConfig.updated` reads. `lowrank.nn.inject` also takes
`"all-linear"`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from . import _regex
from ._checks import require_regex
from .errors import TargetError

Targets = str | Sequence[str] | Mapping[str, Mapping[str, object]]

_GLOB_CHARS = frozenset("*?[")


def matches(name: str, pattern: str) -> bool:
    """Whether module `name` matches `pattern` (suffix, glob or `re:` regex; see module doc)."""
    if pattern.startswith("re:"):
        return _regex.fullmatch(pattern[3:], name)
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def named_suffix(name: str, names: AbstractSet[str]) -> str | None:
    """The longest of `names` that is a suffix of whole dotted components of module `name`
    other than `name` itself (`fc` or `inner.fc` of `blk.inner.fc`), as PEFT matches a list
    of target names; None if none is."""
    parts = name.split(".")
    suffixes = (".".join(parts[i:]) for i in range(1, len(parts)))
    return next((suffix for suffix in suffixes if suffix in names), None)


def parse_targets(targets: Targets) -> dict[str, object]:
    """`{pattern: its own settings}` in order (`{}` for plain patterns; a dict's values as
    given, for `AdapterConfig.updated` to check). `TargetError` for anything else, and for a
    `re:` pattern that is not a regular expression, is longer than 8,192 characters, holds
    a construct no matcher answers in time linear in the name's length (a backreference,
    a conditional `(?(1)…|…)`, an atomic group `(?>…)`, a possessive repeat `*+`), or
    needs an automaton of more than 8,192 states (`lowrank._regex`)."""
    if isinstance(targets, str):
        patterns = [targets] if targets.startswith("re:") else targets.split(",")
        parsed: dict[str, object] = {p.strip(): {} for p in patterns if p.strip()}
    elif isinstance(targets, Mapping):
        parsed = {str(pattern): settings for pattern, settings in targets.items()}
    elif isinstance(targets, Sequence) and all(isinstance(p, str) for p in targets):
        parsed = {p: {} for p in targets}
    else:
        raise TargetError(
            f"targets must be a pattern string, a list of them, 'all-linear' or a dict of "
            f"per-pattern settings, got {targets!r}"
        )
    if not parsed:
        raise TargetError("targets is empty: give at least one module-name pattern")
    for pattern in parsed:
        if pattern.startswith("re:"):
            require_regex("target", pattern, TargetError, pattern[3:])
    return parsed
