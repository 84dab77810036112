"""Child-process entry point that runs one img2dataset job with the probing resizer.

`python -m flows.img2dataset_worker '{"kwargs": {...}, "max_pixels": N, "allow_loopback": false}'`.
Kept apart from `flows.download` because importing img2dataset (OpenCV, albumentations) costs seconds.

img2dataset downloads in a pool of spawned processes. The resizer is pickled into each of them, so it
carries what they must do before downloading: check every address they connect to
(flows.address_guard) and die with this process, so that a worker killed with SIGKILL leaves no pool
process behind that would go on writing a shard that the re-run writes too.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
if __name__ in ("__main__", "__mp_main__") and "torch" not in sys.modules:
    # Only in the worker and its spawned pool processes: img2dataset imports webdataset, which imports
    # torch (about 6 s of CPU per process) for stubs it does without; the downloads never use it.
    sys.modules["torch"] = None  # `import torch` now raises ModuleNotFoundError, which webdataset handles

import img2dataset  # noqa: E402, F401
from img2dataset.resizer import Resizer  # noqa: E402

from flows.address_guard import install_address_guard  # noqa: E402
from flows.image_probe import probe_image  # noqa: E402

_MAX_PIXELS_ENV = "BLIP2_MAX_IMAGE_PIXELS"
_ALLOW_LOOPBACK_ENV = "BLIP2_ALLOW_LOOPBACK"


_watching: list[int] = []


def _exit_when_orphaned() -> None:
    """In a pool process: exit as soon as the worker that started it is gone (this process is re-parented).

    Not PR_SET_PDEATHSIG: it fires when the parent *thread* ends, and the pool starts replacement
    processes (maxtasksperchild) from a helper thread that ends at pool shutdown.
    """
    if _watching:
        return
    _watching.append(os.getppid())

    def watch() -> None:
        while os.getppid() == _watching[0]:
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


class SafeResizer(Resizer):
    """img2dataset's Resizer, but each image's header is probed before OpenCV decodes it.

    The limit and the loopback opt-in are read once, in the parent, and travel with the pickled
    instance to the pool workers, where unpickling installs the address guard.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_pixels = int(os.environ.get(_MAX_PIXELS_ENV, "64000000"))
        self.allow_loopback = os.environ.get(_ALLOW_LOOPBACK_ENV) == "1"

    def __setstate__(self, state):
        self.__dict__.update(state)
        install_address_guard(self.allow_loopback)
        _exit_when_orphaned()

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        data = img_stream.read()
        refusal = probe_image(data, self.max_pixels)
        if refusal is not None:
            return None, None, None, None, None, refusal
        result = super().__call__(io.BytesIO(data), blurring_bbox_list)
        if result[-1] == "Image decoding error":
            return (*result[:-1], "cannot identify image file (not an image)")
        return result


def main(job_json: str) -> None:
    job = json.loads(job_json)
    os.environ[_MAX_PIXELS_ENV] = str(job["max_pixels"])
    os.environ[_ALLOW_LOOPBACK_ENV] = "1" if job.get("allow_loopback") else "0"
    install_address_guard(bool(job.get("allow_loopback")))  # a distributor that downloads in-process
    # The package re-exports a function named `main`, which hides the submodule of that name.
    i2d = sys.modules["img2dataset.main"]
    i2d.Resizer = SafeResizer  # download() builds its resizer from this module attribute
    _start_ray_if_needed(job["kwargs"])
    i2d.download(**job["kwargs"])


def _start_ray_if_needed(kwargs: dict) -> None:
    """The ray distributor joins RAY_ADDRESS; without it, Ray's first task would start a local instance
    listening on every interface, so start a loopback-only one first."""
    if kwargs.get("distributor") == "ray" and not os.environ.get("RAY_ADDRESS"):
        from flows.ray_capfilt import start_local_ray

        start_local_ray()


if __name__ == "__main__":  # img2dataset spawns processes: this guard is required
    main(sys.argv[1])
