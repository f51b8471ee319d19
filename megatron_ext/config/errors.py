"""Configuration errors that report every problem at once, each with its fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One violated rule: which field, what value, which rule, how to fix it."""

    field: str
    value: Any
    rule: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}={self.value!r}: {self.rule}. Fix: {self.fix}"


class ConfigError(ValueError):
    """A configuration that cannot run; ``problems`` lists every violated rule."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} configuration problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))

    def fields(self) -> list[str]:
        return [p.field for p in self.problems]


class ProblemCollector:
    """Collects problems from several checks, then raises one ConfigError."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, field: str, value: Any, rule: str, fix: str) -> None:
        self.problems.append(Problem(field, value, rule, fix))

    def check(self, ok: bool, field: str, value: Any, rule: str, fix: str) -> bool:
        """Record a problem when ``ok`` is false; returns ``ok``."""
        if not ok:
            self.add(field, value, rule, fix)
        return ok

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)
