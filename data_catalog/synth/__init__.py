"""The synthetic corpus: rendered shape scenes with known ground truth, in the public formats.

info = synthesize(Path("var/corpus"), SynthConfig(seed=0, n_pretrain=2000))
with CorpusServer(info.root) as srv:
    urls = url_manifest(info.root, srv.base_url, "pretrain", faults=FaultSpec(http_404=3))
"""

from data_catalog.synth.corpus import CorpusInfo, SynthConfig, image_sets, load_corpus, synthesize
from data_catalog.synth.urls import FaultSpec, UrlManifest, url_manifest

__all__ = [
    "CorpusInfo",
    "FaultSpec",
    "SynthConfig",
    "UrlManifest",
    "image_sets",
    "load_corpus",
    "synthesize",
    "url_manifest",
]
