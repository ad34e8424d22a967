"""The configuration dialect of the project: typed dataclasses whose fields carry a one-line doc (`doc`), and
validation that gathers every problem into one ConfigError naming the key to change, so that a user fixes a
configuration in one round trip, not one error per run.

    @dataclass
    class Settings:
        workers: int = doc("processes", 1)

        def problems(self) -> list[str]:
            return [] if self.workers >= 1 else [f"workers: must be >= 1, got {self.workers}"]

    check(Settings(workers=0), "command line")   # raises ConfigError listing every problem
"""
from __future__ import annotations

import dataclasses
from dataclasses import field


class ConfigError(ValueError):
    """One or more problems in a configuration, each naming the key to change."""

    shared = True  # from a configuration every rank reads alike: the same on every rank, printed once

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:  # the common case reads as one line
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problems in the configuration:\n"
                             + "\n".join(f"  - {p}" for p in problems))


def doc(text: str, default=dataclasses.MISSING, default_factory=dataclasses.MISSING, **metadata):
    """A dataclass field with its one-line documentation attached (shown in --help and by `pretrain.py
    --help-config`). Other metadata (such as `choices`) is kept alongside."""
    kw = {"metadata": {"doc": text, **metadata}}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, **kw)
    return field(default=default, **kw)


def choice_problems(cfg) -> list[str]:
    """A problem for every field whose value is not one of its `choices` metadata."""
    out = []
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, f.name) not in choices:
            out.append(f"{f.name}: one of {', '.join(map(str, choices))}, got {getattr(cfg, f.name)!r}")
    return out


def check(cfg, source: str) -> None:
    """Raise one ConfigError with every problem of `cfg` (its `problems()` and its fields' choices)."""
    problems = choice_problems(cfg) + cfg.problems()
    if problems:
        raise ConfigError(source, problems)
