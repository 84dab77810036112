"""Child-process entry point that runs one img2dataset job with the probing resizer.

`python -m flows.img2dataset_worker '{"kwargs": {...}, "max_pixels": N}'`. Kept apart from
`flows.download` because importing img2dataset (OpenCV, albumentations) costs seconds.
"""

from __future__ import annotations

import io
import json
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import img2dataset  # noqa: E402, F401
from img2dataset.resizer import Resizer  # noqa: E402

from flows.image_probe import probe_image  # noqa: E402

_MAX_PIXELS_ENV = "BLIP2_MAX_IMAGE_PIXELS"


class SafeResizer(Resizer):
    """img2dataset's Resizer, but each image's header is probed before OpenCV decodes it.

    The limit is read once, in the parent, and travels with the pickled instance to the pool workers.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_pixels = int(os.environ.get(_MAX_PIXELS_ENV, "64000000"))

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
    # The package re-exports a function named `main`, which hides the submodule of that name.
    i2d = sys.modules["img2dataset.main"]
    i2d.Resizer = SafeResizer  # download() builds its resizer from this module attribute
    i2d.download(**job["kwargs"])


if __name__ == "__main__":  # img2dataset spawns processes: this guard is required
    main(sys.argv[1])
