"""One way to name layers across fxpress: LoRA targets, quantization `keep` and pruning protection.

A selector entry is one of
- `re:PATTERN`: a regular expression matched against the whole module path (`re.fullmatch`);
- `glob:PATTERN`: a shell glob over the module path (`fnmatch`, `*` crosses dots);
- `type:NAME`: modules whose class is named NAME (`Linear`, `Conv2d`, `LowBitLinear`, ...);
- `kind:KIND`: layers of one kind as the Graph reports them (`linear`, `conv2d`, `embedding`, ...);
- a bare pattern, read by the caller's default: "suffix" (a regular expression matching the path's
  tail from a dot on, so `to_q` matches `mid_block.attentions.0.transformer_blocks.0.attn1.to_q` and
  `attn.*to_(q|k|v)` matches any attention projection), or "glob" (what `keep` has always taken).

Paths are normalised first: wrappers' prefixes that torch.compile and DDP add (`_orig_mod.`,
`module.`) are ignored, so a selector written for the plain model matches a compiled one too.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from fxpress.errors import RecipeError

WRAPPER_PREFIXES = ("_orig_mod.", "module.")
PREFIXES = ("re", "glob", "type", "kind")
DEFAULTS = ("suffix", "glob")


def plain_path(path: str) -> str:
    """Return `path` without the prefixes torch.compile (`_orig_mod.`) and DDP (`module.`) add."""
    parts = [p for p in path.split(".") if p not in ("_orig_mod",)]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


@dataclass(frozen=True)
class Selector:
    """One parsed entry (see the module docstring)."""

    text: str
    how: str
    value: str

    @staticmethod
    def parse(entry: str, default: str = "suffix") -> Selector:
        """Parse `entry`; raises RecipeError for an unknown prefix or an invalid regular expression."""
        if default not in DEFAULTS:
            raise RecipeError(f"selector default must be one of {DEFAULTS}, got {default!r}")
        if not isinstance(entry, str) or not entry:
            raise RecipeError(f"a layer selector must be a non-empty string, got {entry!r}")
        head, sep, rest = entry.partition(":")
        how, value = (head, rest) if sep and head in PREFIXES else (default, entry)
        if not value:
            raise RecipeError(f"layer selector {entry!r} has nothing after {head + ':'!r}")
        if how in ("re", "suffix"):
            try:
                re.compile(value)
            except re.error as exc:
                raise RecipeError(f"layer selector {entry!r} is not a valid regular expression: {exc}") from exc
        return Selector(entry, how, value)

    def matches(self, path: str, module_type: str = "", kind: str = "") -> bool:
        """Whether the module at `path` (of class `module_type`, layer kind `kind`) is selected."""
        path = plain_path(path)
        if self.how == "re":
            return re.fullmatch(self.value, path) is not None
        if self.how == "suffix":
            return re.fullmatch(rf"(?:.*\.)?(?:{self.value})", path) is not None
        if self.how == "glob":
            return fnmatch.fnmatchcase(path, self.value)
        if self.how == "type":
            return module_type == self.value
        return kind == self.value


def select(entries: Iterable[str], candidates: dict[str, tuple[str, str]], *, default: str = "suffix",
           what: str = "layer selector", require_each: bool = True) -> dict[str, str]:
    """Return {path: the entry that selected it} over `candidates` ({path: (class name, layer kind)}), in
    candidate order.

    With `require_each`, an entry that selects nothing raises RecipeError naming the entry and the
    candidate paths closest to it.
    """
    chosen: dict[str, str] = {}
    for entry in entries:
        selector = Selector.parse(entry, default)
        hits = [p for p, (cls, kind) in candidates.items() if selector.matches(p, cls, kind)]
        if not hits and require_each:
            raise RecipeError(f"{what} {entry!r} matches nothing; {closest_hint(selector, candidates)}")
        for path in hits:
            chosen.setdefault(path, entry)
    return {p: chosen[p] for p in candidates if p in chosen}


def closest_hint(selector: Selector, candidates: dict[str, tuple[str, str]]) -> str:
    """A short hint of what `selector` could have meant: the closest paths, types or kinds."""
    if selector.how == "type":
        names = sorted({cls for cls, _ in candidates.values()})
        return f"module types here: {', '.join(names[:12])}"
    if selector.how == "kind":
        return f"layer kinds here: {', '.join(sorted({k for _, k in candidates.values() if k}))}"
    paths = list(candidates)
    probe = re.sub(r"[\^$()|\[\]{}+?\\]|\.\*", "", selector.value).replace("*", "")
    near = difflib.get_close_matches(probe, paths, n=3, cutoff=0.0) if probe else paths[:3]
    tails = {p.rsplit(".", 1)[-1] for p in paths}
    near_tails = difflib.get_close_matches(probe.rsplit(".", 1)[-1], sorted(tails), n=3, cutoff=0.3)
    hint = f"closest module paths: {', '.join(near) or 'none'}"
    return hint + (f" (names ending like: {', '.join(near_tails)})" if near_tails else "")
