"""Admission by estimated cost: refuse at once what cannot finish before its deadline.

The engine times every stage of every job (``JobResult.timings``). ``CostModel`` turns those
measurements into two running averages (exponentially weighted, so it follows the machine's
current speed):

- seconds per megapixel of the per-pixel CPU stages (decode, full-resolution merge, encode);
- seconds per network pass on the device (detect, instance, fusion over the batch, divided by
  the batch's images plus instances: an image is one full-image pass, each instance one more).

A request's cost is ``samples * (megapixels * s_per_mp + (1 + instances) * s_per_pass)``: each
sample of a sampling model (``samples=N``, zhao-pixelated) is merged, encoded and drawn like a
request of its own, so it counts as one unit of work (1 for every other model). The queue keeps the
sum of the costs admitted and not yet finished (the backlog); a request whose
``backlog + cost`` would end after its deadline is refused with 503 ``overloaded`` and a
Retry-After of the time the backlog needs to drain enough. Until the first batch is measured
nothing is refused for cost. The estimate treats the backlog as served one job after another, so
it errs on the side of refusing when batches overlap CPU and device work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.core.jobs import Job, JobResult

PIXEL_STAGES = ("decode", "merge", "encode")
DEVICE_STAGES = ("detect", "instance", "fusion")


@dataclass
class CostModel:
    seconds_per_megapixel: float = 0.0
    seconds_per_pass: float = 0.0
    instances_per_image: float = 0.0  # seen with the detector, for requests without boxes
    seconds_per_job: float = 0.0  # the average job, for a backlog known only by its length
    batches_seen: int = 0
    alpha: float = 0.2  # weight of the newest batch

    @property
    def measured(self) -> bool:
        return self.batches_seen > 0

    def _blend(self, old: float, new: float) -> float:
        return new if self.batches_seen == 0 else (1 - self.alpha) * old + self.alpha * new

    def observe_batch(self, batch: Sequence[tuple[Job, JobResult]]) -> None:
        """Learn from one batch's successful results (their own stage timings)."""
        if not batch:
            return
        sized = [(job, result) for job, result in batch if job.pixels > 0]
        megapixels = sum(job.pixels * job.options.samples for job, _ in sized) / 1e6
        pixel_seconds = sum(
            result.timings.get(stage, 0.0) for _, result in sized for stage in PIXEL_STAGES
        )
        instances = sum(len(result.boxes) for _, result in batch)
        passes = sum((1 + len(result.boxes)) * job.options.samples for job, result in batch)
        # detect/instance/fusion are batch-wide timings, copied into every job of the batch
        device_seconds = sum(batch[0][1].timings.get(stage, 0.0) for stage in DEVICE_STAGES)
        if sized:
            self.seconds_per_megapixel = self._blend(
                self.seconds_per_megapixel, pixel_seconds / max(megapixels, 1e-3)
            )
        self.seconds_per_pass = self._blend(self.seconds_per_pass, device_seconds / passes)
        self.instances_per_image = self._blend(self.instances_per_image, instances / len(batch))
        job_seconds = (
            sum(result.timings.get(stage, 0.0) for _, result in batch for stage in PIXEL_STAGES)
            + device_seconds
        ) / len(batch)
        self.seconds_per_job = self._blend(self.seconds_per_job, job_seconds)
        self.batches_seen += 1

    def estimate(self, job: Job) -> float:
        """Seconds ``job`` is expected to take once it is running."""
        options = job.options
        instances: float
        if options.boxes is not None:
            instances = min(len(options.boxes), options.max_instances)
        else:
            instances = min(float(options.max_instances), self.instances_per_image)
        return options.samples * (
            max(job.pixels, 1) / 1e6 * self.seconds_per_megapixel
            + (1 + instances) * self.seconds_per_pass
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "seconds_per_megapixel": self.seconds_per_megapixel,
            "seconds_per_pass": self.seconds_per_pass,
            "instances_per_image": self.instances_per_image,
            "seconds_per_job": self.seconds_per_job,
            "batches_seen": float(self.batches_seen),
        }

    @staticmethod
    def mean(models: Sequence[CostModel]) -> CostModel:
        """One model for a fleet of workers: the average of the measured ones."""
        measured = [m for m in models if m.measured]
        if not measured:
            return CostModel()
        n = len(measured)
        return CostModel(
            seconds_per_megapixel=sum(m.seconds_per_megapixel for m in measured) / n,
            seconds_per_pass=sum(m.seconds_per_pass for m in measured) / n,
            instances_per_image=sum(m.instances_per_image for m in measured) / n,
            seconds_per_job=sum(m.seconds_per_job for m in measured) / n,
            batches_seen=sum(m.batches_seen for m in measured),
        )

    @staticmethod
    def from_dict(data: dict[str, float]) -> CostModel:
        return CostModel(
            seconds_per_megapixel=float(data.get("seconds_per_megapixel", 0.0)),
            seconds_per_pass=float(data.get("seconds_per_pass", 0.0)),
            instances_per_image=float(data.get("instances_per_image", 0.0)),
            seconds_per_job=float(data.get("seconds_per_job", 0.0)),
            batches_seen=int(data.get("batches_seen", 0)),
        )


def refusal(
    backlog_s: float, cost_s: float, remaining_s: float, min_retry_after_s: float
) -> float | None:
    """None if ``backlog + cost`` fits in ``remaining``; else the Retry-After (s) to send.

    Retry-After is how long the backlog needs to drain for this request to fit in a fresh
    deadline of ``remaining`` seconds, never less than ``min_retry_after_s``.
    """
    if backlog_s + cost_s <= remaining_s:
        return None
    return max(min_retry_after_s, backlog_s + cost_s - remaining_s)


__all__ = ["CostModel", "refusal"]
