"""``zhao-pixelated`` in the product's pipeline: several seeded samples per image, one batch.

``ZhaoPipeline`` is ``AutomaticPipeline`` (input policy, L at 128 x 128, the product's Lab merge)
with a sampling device stage: every image of the batch and every sample of every image go through
one ``sample_ab`` call (the incremental raster loop over the 32 x 32 ab grid), each image with its
own ``samples`` (1 to ``MAX_SAMPLES``) and ``seed``. Without a seed one is drawn and returned
(``Prediction.seed``, then the answer's ``seed``), so any sample can be drawn again. The first
sample is the ``Prediction``'s ``ab``; the others follow in ``samples`` and are merged the same way.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from PIL import Image

from models.automatic import AutomaticPipeline, AutomaticPreparedImage
from models.constants import SEED_LIMIT
from models.image_input import InputImage
from models.lab import normalize_l, rgb_to_lab
from models.pipeline import (
    ColorizedImage,
    ColorizeOptions,
    OptionsError,
    Prediction,
    PreparedImage,
)
from models.preprocess import NETWORK_SIZE, resize_to_network, to_tensor
from models.zhao_pixelated import MAX_SAMPLES, ZhaoPixelated, sample_ab, upsample_ab


class ZhaoPipeline(AutomaticPipeline):
    """``AutomaticPipeline`` whose device stage draws ``options.samples`` colourings per image."""

    max_samples = MAX_SAMPLES

    @property
    def network_resolution(self) -> int:
        """``resolution="network"`` is the product's 256 x 256 (the evaluation protocol's size),
        not the 128 px the network samples at."""
        return NETWORK_SIZE

    def check_samples(self, options: ColorizeOptions) -> None:
        if not 1 <= options.samples <= MAX_SAMPLES:
            raise OptionsError(
                f"samples must be between 1 and {MAX_SAMPLES}, got {options.samples}"
            )
        if options.seed is not None and not 0 <= options.seed < SEED_LIMIT:
            raise OptionsError(f"seed must be between 0 and 2**63 - 1, got {options.seed}")

    def prepare(
        self, image: Image.Image | InputImage, options: ColorizeOptions | None = None
    ) -> AutomaticPreparedImage:
        """As every automatic model; ``resolution=network`` is the product's 256 x 256 (the
        evaluation protocol's size): the L of the 256 x 256 squash, ab upsampled from 128."""
        prepared = super().prepare(image, options)
        if prepared.options.resolution == "network":
            squashed = resize_to_network(prepared.source.rgb)
            prepared.l_norm = normalize_l(rgb_to_lab(to_tensor(squashed))[0:1])
        return prepared

    def _predict_images(self, batch: Sequence[PreparedImage]) -> list[Prediction]:
        """One ``sample_ab`` call for every sample of every image still wanted."""
        seeds = [
            s if (s := p.options.seed) is not None else secrets.randbelow(2**31) for p in batch
        ]
        counts = [p.options.samples for p in batch]
        stacked = torch.stack([self._network_l(p) for p in batch])
        x = stacked.to(self.device, self.dtype, non_blocking=True)
        model = self.model
        assert isinstance(model, ZhaoPixelated)
        sampled = sample_ab(model, x, seeds, counts)
        predictions = []
        for k, seed in enumerate(seeds):
            low = sampled.image(k).float()
            abs_ = list(upsample_ab(low, self.input_size).cpu())  # normalised ab at input size
            predictions.append(Prediction(abs_[0], [], [], {}, samples=tuple(abs_[1:]), seed=seed))
        return predictions

    def merge(
        self,
        prepared: PreparedImage,
        prediction: Prediction,
        should_stop: Callable[[], bool] | None = None,
    ) -> ColorizedImage:
        """Each sample through the Lab merge; the first is ``image``, the others ``samples``."""

        def to_merge(ab: torch.Tensor) -> torch.Tensor:
            if prepared.options.resolution != "network":
                return ab
            return upsample_ab(ab[None], NETWORK_SIZE)[0]

        first = super().merge(
            prepared, replace(prediction, ab=to_merge(prediction.ab)), should_stop
        )
        others = [
            super(ZhaoPipeline, self)
            .merge(prepared, replace(prediction, ab=to_merge(ab)), should_stop)
            .image
            for ab in prediction.samples
        ]
        return replace(first, samples=tuple(others), seed=prediction.seed)
