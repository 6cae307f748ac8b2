"""Constants that processes without torch need too (the HTTP API in Redis mode, the settings).

This module imports nothing: the API process reads the detector's file name and the saturation
range from here instead of spelling them again.
"""

from __future__ import annotations

SATURATION_RANGE = (0.0, 2.0)
"""Allowed colour strengths: 0 gives the grayscale L, 1 the model's colours, 2 twice their chroma."""

SEED_LIMIT = 2**63
"""A sampling model's seeds are 0 <= seed < 2**63 (``torch.Generator.manual_seed``'s range)."""

TEMPERATURE_RANGE = (0.01, 1.0)
"""The per-request ``temperature`` of the models that decode by the annealed mean (zhang-eccv16,
li-dcnn): softmax(z / T) over the 313 bins, from close to the mode (0.01) to the plain mean (1)."""

ANNEALED_MEAN_MODELS = {"zhang-eccv16": 1.0, "li-dcnn": 0.38}
"""The models that decode by the annealed mean, and each one's default temperature (ECCV16: 1, the
PyTorch release's behaviour; li-dcnn: ECCV16's paper value). tests/test_temperature.py checks it
against the loaded networks."""

DETECTOR_FILENAMES = {
    "v1": "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
    "v2": "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
}
"""torchvision's COCO Mask R-CNN weight files (the names its URLs end in; tests/test_app.py checks
that they agree with torchvision's own)."""

MAX_HINTS = 64
"""Most colour hints one image may carry (the SIGGRAPH17 user study used far fewer)."""

HINT_SIZE_RANGE = (1, 9)
"""Side of a hint's square patch in the network's 256x256 input: the authors' ``sample_Ps``."""

DEFAULT_HINT_SIZE = 3
