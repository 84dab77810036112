"""docs/scaling.md points at files that exist, and its arithmetic is right."""

from __future__ import annotations

import re

from conftest import REPO

DOC = (REPO / "docs" / "scaling.md").read_text()


def test_every_infra_file_the_guide_names_exists():
    named = set(re.findall(r"`?(infra/[\w./-]+\w)", DOC))
    assert "infra/launch.py" in named and "infra/ray/capfilt-cluster.yaml" in named
    for path in named - {"infra/.env"}:  # the one the reader creates (git-ignored)
        assert (REPO / path).exists(), path


def test_cost_figures_follow_from_their_formulas():
    assert f"{129e6 / 1300 / 3600:.1f} node-hours" in DOC  # download, one 16-core node
    assert f"{129e6 / 400 / 3600:.1f}, i.e. **under 90" in DOC  # CapFilt at the 400 images/s target
    assert f"{16 * 6 * 24:,}" in DOC and f"{16 * 3 * 24:,}" in DOC and f"{16 * 9 * 24:,}" in DOC
    assert f"{250_000 * 1680 / 800:,.0f} s = {250_000 * 1680 / 800 / 86400:.1f} days" in DOC
    assert "pending: `benchmarks/capfilt_throughput.py --gpu`" in DOC
