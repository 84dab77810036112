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

    @property
    def shards_root(self) -> Path:
        return self.home / "shards"

    @property
    def capfilt_root(self) -> Path:
        return self.home / "capfilt"

    def shards(self, source: str) -> Path:
        return self.shards_root / source

    def capfilt(self, config_hash: str, source: str) -> Path:
        return self.capfilt_root / config_hash / source

    def capfilt_sidecar(self, config_hash: str, source: str, shard: str) -> Path:
        """One shard's CapFilt output: key, web caption, candidates, CLIP scores, ranked top-2."""
        return self.capfilt(config_hash, source) / f"{shard}.parquet"

    def run_dir(self, stage: str, run_id: str) -> Path:
        return self.home / "runs" / stage / run_id

    def report_dir(self, run_id: str) -> Path:
        return self.home / "reports" / run_id
