"""Plain text in and out: tables for the inspection printouts (rule plans, per-layer relevance audits) and the
parsing of parameter values and method specs given as text (CLI ``--param``, ``--methods agf[no_a=true]``)."""
from __future__ import annotations

from typing import Any, Sequence


def parse_value(text: str) -> Any:
    """A parameter value: bool (true/false/yes/no/on/off), None (none/null), int, float, else the string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def split_specs(text: str) -> list[str]:
    """Split a comma-separated list of method specs, keeping commas inside ``[…]`` (``a,b[x=1,y=2]``)."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name[key=value,…]`` → (name, parameters); ``ValueError`` naming a malformed spec."""
    name, bracket, rest = spec.partition("[")
    if not bracket:
        return spec.strip(), {}
    if not rest.endswith("]"):
        raise ValueError(f"method spec '{spec}' has an unclosed '['; write name[key=value,…]")
    params: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in rest[:-1].split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"method spec '{spec}': expected key=value, got '{item}'")
        params[key.strip()] = parse_value(value.strip())
    return name.strip(), params


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, with a dashed rule under the header."""
    table = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The same table as GitHub markdown."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def candidate_list(names: list[str], limit: int = 12) -> str:
    """A short listing of names (layers …): the first few and the last ones."""
    if len(names) > limit:
        return ", ".join(names[:3]) + ", …, " + ", ".join(names[-(limit - 3):]) + f" ({len(names)} in all)"
    return ", ".join(names) if names else "none"
