"""Where every stage reads and writes, under one root (`BLIP2_HOME`, default `./var`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def blip2_home() -> Path:
    """The data root: `$BLIP2_HOME` when set, else `./var` under the current directory."""
    return Path(os.environ.get("BLIP2_HOME", "var")).resolve()


@dataclass(frozen=True)
class Layout:
    """The on-disk layout of DESIGN.md, rooted at `home`."""

    home: Path

    @classmethod
    def from_env(cls) -> Layout:
        return cls(blip2_home())

    @property
    def catalog(self) -> Path:
        return self.home / "catalog.duckdb"

    def manifests(self, source: str) -> Path:
        return self.home / "manifests" / source

    def shards(self, source: str) -> Path:
        return self.home / "shards" / source

    def capfilt(self, config_hash: str, source: str) -> Path:
        return self.home / "capfilt" / config_hash / source

    def run_dir(self, stage: str, run_id: str) -> Path:
        return self.home / "runs" / stage / run_id

    def report_dir(self, run_id: str) -> Path:
        return self.home / "reports" / run_id
