"""Value types for the commands' argparse flags; each refuses a bad value with a message."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def batch_size(text: str) -> int | None:
    """``auto`` (None: ``service.settings.auto_batch_size`` of the device, once the model is
    loaded) or a positive integer."""
    return None if text == "auto" else positive_int(text)


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1] (a score threshold)."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (a share held out)."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def hint_counts(text: str) -> tuple[int, ...]:
    """``N`` or a comma-separated list of distinct counts ``0,1,2,5,10``, each in 0..MAX_HINTS,
    returned in increasing order (``evaluate --hints``: one run per count)."""
    from models.constants import MAX_HINTS

    parts = [part.strip() for part in text.split(",")]
    try:
        counts = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count or a comma-separated list of counts such as 0,1,2,5,10, got {text!r}"
        ) from None
    for count in counts:
        if not 0 <= count <= MAX_HINTS:
            raise argparse.ArgumentTypeError(
                f"each count must be between 0 and {MAX_HINTS} (the most hints an image "
                f"takes), got {count}"
            )
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"a count is given twice in {text!r}")
    return tuple(sorted(counts))


def temperature(text: str) -> float:
    """The annealed mean's temperature, within ``models.constants.TEMPERATURE_RANGE``."""
    from models.constants import TEMPERATURE_RANGE  # imports nothing

    return float_in_range(text, TEMPERATURE_RANGE)


def float_in_range(text: str, bounds: tuple[float, float]) -> float:
    """A float within ``bounds`` (inclusive); nan is refused."""
    value = float(text)
    low, high = bounds
    if not low <= value <= high:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
    return value


def temperature_help() -> str:
    """The ``--temperature`` flag's help, for colorize and evaluate."""
    from models.constants import ANNEALED_MEAN_MODELS, TEMPERATURE_RANGE

    low, high = TEMPERATURE_RANGE
    defaults = ", ".join(f"{m} {t:g}" for m, t in ANNEALED_MEAN_MODELS.items())
    return (
        f"the annealed mean's temperature, {low:g} to {high:g}, for the models that decode by it "
        f"({', '.join(ANNEALED_MEAN_MODELS)}): softmax(z / T) over the 313 bins; 1 the plain "
        f"mean, smaller more vivid (default: the model's own, {defaults})"
    )
