"""Expand SLURM host lists (``gpu[01-04,07]``, ``a[1-2]-b[3-4],login1``) into host names.

Same rules as ``scontrol show hostnames``: commas outside brackets separate entries, a bracket
holds comma-separated numbers or ``lo-hi`` ranges, zero padding follows the width of ``lo``, and
several brackets in one entry multiply out left to right.
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """All host names of ``hostlist`` in order; raises ValueError naming the bad part."""
    hosts: list[str] = []
    for entry in _split_top_level(hostlist.strip()):
        hosts.extend(_expand_entry(entry))
    if not hosts:
        raise ValueError(f"host list {hostlist!r} names no hosts")
    return hosts


def _split_top_level(text: str) -> list[str]:
    entries, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"host list {text!r}: nested '['")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"host list {text!r}: ']' without '['")
        if char == "," and depth == 0:
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"host list {text!r}: '[' is never closed")
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def _expand_entry(entry: str) -> list[str]:
    match = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", entry)
    if not match:
        return [entry]
    prefix, body, rest = match.groups()
    tails = _expand_entry(rest) if rest else [""]
    return [prefix + number + tail for number in _expand_ranges(body, entry) for tail in tails]


def _expand_ranges(body: str, entry: str) -> list[str]:
    numbers = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise ValueError(f"host list entry {entry!r}: {part!r} is not a number or lo-hi range")
        lo_text, hi_text = match.group(1), match.group(2) or match.group(1)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"host list entry {entry!r}: range {part!r} runs backwards")
        width = len(lo_text)
        numbers.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return numbers
