"""Download the weight files, verify them and prove they load (``python -m service fetch-weights``).

Four sources, each described by data (``RemoteFile``):

* the authors' checkpoint zip on Google Drive (``models.checkpoints.OFFICIAL_ZIP_DRIVE_ID``); only
  ``coco_finetuned_mask_256_ffs/latest_net_{G,GF,GComp}.pth`` are extracted, to
  ``DIR/checkpoints/coco_finetuned_mask_256_ffs/``. No checksum is published: the files are
  verified by loading them strictly, and their sha256 is printed for the record;
* OpenMMLab's single-file conversion (``models.checkpoints.MMAGIC_URL``) to ``DIR/<its name>``. Its
  name ends in ``-<8 hex>.pth``, the first 8 hex digits of the file's sha256 (OpenMMLab's
  ``tools/publish_model.py`` names files ``<name>-<sha256sum[:8]>.pth``); that prefix is checked;
* torchvision's COCO Mask R-CNN (``models.detector.DETECTOR_WEIGHTS``) to ``DIR/<its name>``, whose
  name carries the sha256 prefix that torchvision itself checks; that prefix is checked;
* on request, torchvision's ImageNet VGG16 (``VGG16_Weights.IMAGENET1K_V1``), the LPIPS backbone
  of ``evaluate``, to ``DIR/vgg16-397923af.pth``; its sha256 prefix is checked the same way.

Every download streams into a temporary file beside its destination and is renamed into place only
after the byte count and checksum are right, so no half-written or unverified file is ever left.
Files already present and verified are not downloaded again. Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from models.atomic import atomic_path, temp_beside
from models.checkpoints import (
    NETWORK_FILES,
    OFFICIAL_VARIANT,
    sha256_file,
)
from service.weights.http import PART_SUFFIX, download
from service.weights.sources import (
    CHUNK,
    ChecksumError,
    DetectorChoice,
    DownloadError,
    FetchedFile,
    FetchReport,
    RemoteFile,
    UnreachableError,
    Variant,
    WeightSources,
)

if TYPE_CHECKING:
    from models.registry import WeightFile

log = logging.getLogger(__name__)


def _verified_present(path: Path, remote: RemoteFile) -> str | None:
    """The sha256 of ``path`` if it exists and matches ``remote``'s checksum, else None."""
    if not path.is_file():
        return None
    if remote.sha256_prefix is None:  # nothing to check it against: hashing it would be wasted
        log.warning("%s exists but has no known checksum: downloading it again", path)
        return None
    digest = sha256_file(path)
    if remote.matches(digest):
        return digest
    log.warning(
        "%s exists but does not match the checksum %s: downloading it again",
        path,
        remote.sha256_prefix,
    )
    return None


def _prove(
    paths: list[Path], check: Callable[[], object], what: str, how: str = "downloaded"
) -> None:
    """Run ``check()``; if the files do not load, remove them and raise ``DownloadError``."""
    from models.checkpoints import CheckpointError

    try:
        check()
    except CheckpointError as exc:
        for path in paths:
            path.unlink(missing_ok=True)
        raise DownloadError(f"{what} {how} but does not load, removed it: {exc}") from exc


def fetch_single(
    remote: RemoteFile,
    folder: Path,
    *,
    timeout: float,
    progress: bool,
    verify: Callable[[Path], object] | None,
) -> FetchedFile:
    """A single checksummed file (MMagic, detector) into ``folder``, skipped if already right."""
    path = folder / remote.filename
    present = _verified_present(path, remote)
    if present is not None:
        return FetchedFile(path, present, downloaded=False)
    sha256 = download(remote, path, timeout=timeout, progress=progress)
    if verify is not None:
        _prove([path], lambda: verify(path), str(path))
    return FetchedFile(path, sha256, downloaded=True)


def official_dir(folder: Path) -> Path:
    return folder / "checkpoints" / OFFICIAL_VARIANT


def _present_official(target: Path) -> list[FetchedFile] | None:
    """The three files in ``target`` if they are all there and load (hashed by the loader)."""
    from models.checkpoints import CheckpointError, load_networks

    if not all((target / spec.filename).is_file() for spec in NETWORK_FILES):
        return None
    try:
        networks = load_networks(target)
    except CheckpointError as exc:
        log.warning("%s: present but not loadable (%s): downloading again", target, exc)
        return None
    return [FetchedFile(f.path, f.sha256, downloaded=False) for f in networks.files]


def _zip_member(archive: zipfile.ZipFile, filename: str) -> zipfile.ZipInfo:
    suffix = f"{OFFICIAL_VARIANT}/{filename}"
    for info in archive.infolist():
        if info.filename.replace("\\", "/").endswith(suffix) and not info.is_dir():
            return info
    names = ", ".join(i.filename for i in archive.infolist()[:8])
    raise DownloadError(f"the checkpoint zip has no */{suffix} (it holds {names} ...)")


def fetch_official(
    remote: RemoteFile, folder: Path, *, timeout: float, progress: bool, verify: bool = True
) -> list[FetchedFile]:
    """The authors' zip -> ``folder/checkpoints/coco_finetuned_mask_256_ffs/latest_net_*.pth``."""
    from models.checkpoints import load_networks

    target = official_dir(folder)
    present = _present_official(target)
    if present is not None:
        return present
    archive_path = temp_beside(folder / remote.filename, PART_SUFFIX)
    written: list[FetchedFile] = []
    try:
        zip_sha256 = download(remote, archive_path, timeout=timeout, progress=progress)
        log.info("checkpoint zip sha256 %s", zip_sha256)
        target.mkdir(parents=True, exist_ok=True)
        try:
            archive = zipfile.ZipFile(archive_path)
        except zipfile.BadZipFile as exc:
            raise DownloadError(f"{remote.url}: not a zip file ({exc})") from exc
        with archive:
            for spec in NETWORK_FILES:
                member = _zip_member(archive, spec.filename)
                path = target / spec.filename
                digest = hashlib.sha256()
                try:
                    with (
                        atomic_path(path, PART_SUFFIX) as temp,
                        archive.open(member) as source,
                        temp.open("xb") as out,
                    ):
                        while block := source.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                except (zipfile.BadZipFile, OSError) as exc:
                    raise DownloadError(
                        f"{remote.url}: cannot extract {member.filename} ({exc})"
                    ) from exc
                written.append(FetchedFile(path, digest.hexdigest(), downloaded=True))
    except BaseException:
        for item in written:
            item.path.unlink(missing_ok=True)
        raise
    finally:
        archive_path.unlink(missing_ok=True)
    if verify:
        _prove([f.path for f in written], lambda: load_networks(target), str(target))
    return written


@dataclass(frozen=True)
class PlannedFile:
    """A file ``fetch_weights`` makes sure of: where it goes and where it comes from."""

    path: Path
    remote: RemoteFile
    note: str = ""  # how to get it out of the download, where that is not the file itself


def planned_files(
    folder: Path,
    variant: Variant = "official",
    detector: DetectorChoice = "v1",
    sources: WeightSources | None = None,
    *,
    lpips_vgg16: bool = False,
) -> list[PlannedFile]:
    """Every file ``fetch_weights(folder, variant, detector)`` provides, at its exact path."""
    sources = sources or WeightSources.default()
    planned = []
    if variant == "official":
        target = official_dir(folder)
        note = f"{sources.official_zip.filename}: */{OFFICIAL_VARIANT}/"
        planned += [
            PlannedFile(target / spec.filename, sources.official_zip, note + spec.filename)
            for spec in NETWORK_FILES
        ]
    else:
        planned.append(PlannedFile(folder / sources.mmagic.filename, sources.mmagic))
    if detector != "none" and detector in sources.detectors:
        remote = sources.detectors[detector]
        planned.append(PlannedFile(folder / remote.filename, remote))
    if lpips_vgg16 and sources.lpips_vgg16 is not None:
        planned.append(PlannedFile(folder / sources.lpips_vgg16.filename, sources.lpips_vgg16))
    return planned


def how_to_get_them(
    missing: list[PlannedFile], folder: Path, variant: str, detector: str, lpips_vgg16: bool = False
) -> str:
    """What to do when the files cannot be downloaded here: a mirror, or copying them in by hand."""
    if not missing:
        return ""
    remotes = list(dict.fromkeys(item.remote for item in missing))
    lines = ["Missing now:"]
    lines += [f"  {item.path}" for item in missing]
    flags = f"--dir {folder}"
    if variant != "official":
        flags += f" --variant {variant}"
    if detector != "v1":
        flags += f" --detector {detector}"
    if lpips_vgg16:
        flags += " --lpips-vgg16"
    lines += [
        "To get them without this machine reaching the original hosts, either:",
        f"  * a mirror (any HTTP server) serving {', '.join(r.filename for r in remotes)}:",
        f"      python -m service fetch-weights {flags} --base-url http://MIRROR/PATH/",
        "  * or by hand: on a machine with internet, download",
    ]
    lines += [f"      {r.url}" + (f"  (save as {r.filename})" if r.filename not in r.url else "")
              for r in remotes]  # fmt: skip
    lines.append("    and copy the files to exactly the paths above:")
    for item in missing:
        source = item.note or item.remote.filename
        lines.append(f"      {source}  ->  {item.path}")
    lines.append(
        "    then run this command again: it verifies the files in place (checksum, strict load) "
        "and downloads nothing that is already right."
    )
    return "\n".join(lines)


def fetch_weights(
    folder: Path,
    variant: Variant = "official",
    detector: DetectorChoice = "v1",
    *,
    sources: WeightSources | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    verify: bool = True,
    lpips_vgg16: bool = False,
) -> FetchReport:
    """Download what ``variant`` and ``detector`` need into ``folder``; verify and load each.

    ``lpips_vgg16``: also torchvision's VGG16, the LPIPS backbone of ``evaluate``. When a host
    cannot be reached, the error lists every file still missing and how to get it another way (a
    mirror, or copying the files in by hand).
    """
    sources = sources or WeightSources.default()
    try:
        return _fetch_all(
            folder, variant, detector, sources, timeout, progress, verify, lpips_vgg16
        )
    except UnreachableError as exc:
        missing = [
            p
            for p in planned_files(folder, variant, detector, sources, lpips_vgg16=lpips_vgg16)
            if not p.path.is_file()
        ]
        advice = how_to_get_them(missing, folder, variant, detector, lpips_vgg16)
        raise UnreachableError(f"{exc}\n{advice}" if advice else str(exc)) from exc


def _fetch_all(
    folder: Path,
    variant: Variant,
    detector: DetectorChoice,
    sources: WeightSources,
    timeout: float,
    progress: bool,
    verify: bool,
    lpips_vgg16: bool,
) -> FetchReport:
    from models.checkpoints import load_networks
    from models.detector import BoxDetector

    report = FetchReport()
    if variant == "official":
        report.files += fetch_official(
            sources.official_zip, folder, timeout=timeout, progress=progress, verify=verify
        )
        report.checkpoints = folder / "checkpoints"
    else:
        item = fetch_single(
            sources.mmagic,
            folder,
            timeout=timeout,
            progress=progress,
            verify=load_networks if verify else None,
        )
        report.files.append(item)
        report.checkpoints = item.path
    if detector != "none":
        if detector not in sources.detectors:
            raise DownloadError(f"no download source for detector {detector!r}")
        version = detector
        item = fetch_single(
            sources.detectors[detector],
            folder,
            timeout=timeout,
            progress=progress,
            verify=(lambda path: BoxDetector.from_file(path, version)) if verify else None,
        )
        report.files.append(item)
        report.detector_weights = item.path
    if lpips_vgg16:
        from evaluation.metrics import LpipsMetric

        if sources.lpips_vgg16 is None:
            raise DownloadError("no download source for the LPIPS VGG16 weights")
        item = fetch_single(
            sources.lpips_vgg16,
            folder,
            timeout=timeout,
            progress=progress,
            verify=LpipsMetric.from_vgg16_file if verify else None,
        )
        report.files.append(item)
        report.lpips_vgg16 = item.path
    return report


def _install_local(source: Path, remote: RemoteFile, path: Path) -> FetchedFile:
    """A copy brought by hand, checked against ``remote``'s checksum, installed atomically."""
    digest = sha256_file(source)
    if not remote.matches(digest):
        raise ChecksumError(
            f"{source}: sha256 {digest} is not that of the official {remote.filename} "
            f"({remote.sha256_prefix}); not installed"
        )
    with atomic_path(path) as temp:
        shutil.copyfile(source, temp)
    return FetchedFile(path, digest, downloaded=True)


def _copy_checked(source: Path, path: Path) -> str:
    """Copy ``source`` to ``path`` atomically; the copy's sha256 must equal the source's."""
    expected = sha256_file(source)
    with atomic_path(path, PART_SUFFIX) as temp:
        shutil.copyfile(source, temp)
        copied = sha256_file(temp)
        if copied != expected:
            raise ChecksumError(
                f"{source}: the copy's sha256 {copied} differs from the source's {expected} "
                "(the source changed or the disk failed); not installed"
            )
    return expected


def install_official_copy(
    source: Path,
    folder: Path,
    detector: DetectorChoice = "v1",
    *,
    sources: WeightSources | None = None,
    verify: bool = True,
) -> FetchReport:
    """InstColorization's files brought by hand: ``source`` is the unzipped ``checkpoints.zip``
    (``checkpoints/``, ``coco_finetuned_mask_256_ffs/`` or the folder of the three files).

    The three files are copied to ``folder/checkpoints/coco_finetuned_mask_256_ffs/``, each copy's
    sha256 checked against its source (no official digest is published), then loaded strictly
    (``verify``); a copy that does not load is removed. The detector's file, if ``source`` holds it
    under torchvision's name, is checked against the sha256 prefix in that name and installed too.
    """
    from models.checkpoints import find_official_dir, load_networks
    from models.detector import BoxDetector

    sources = sources or WeightSources.default()
    found = find_official_dir(source)
    if found is None:
        names = ", ".join(spec.filename for spec in NETWORK_FILES)
        raise DownloadError(
            f"{source}: no {names} there, nor under {OFFICIAL_VARIANT}/ or "
            f"checkpoints/{OFFICIAL_VARIANT}/ (unzip the authors' checkpoints.zip and give its "
            "folder)"
        )
    target = official_dir(folder)
    target.mkdir(parents=True, exist_ok=True)
    report = FetchReport(checkpoints=folder / "checkpoints")
    written: list[Path] = []
    try:
        for spec in NETWORK_FILES:
            path = target / spec.filename
            digest = _copy_checked(found / spec.filename, path)
            written.append(path)
            report.files.append(FetchedFile(path, digest, downloaded=True))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    if verify:
        _prove(written, lambda: load_networks(target), str(target), "copied")
    remote = sources.detectors.get(detector) if detector != "none" else None
    if remote is not None and detector != "none":
        # only inside ``source``: the given folder and the ones between it and the files
        inside = [found, *(p for p in found.parents if p.is_relative_to(source))]
        brought = next(
            (d / remote.filename for d in inside if (d / remote.filename).is_file()), None
        )
        if brought is not None:
            path = folder / remote.filename
            item = _install_local(brought, remote, path)
            if verify:
                version = detector
                _prove([path], lambda: BoxDetector.from_file(path, version), str(path), "copied")
            report.files.append(item)
            report.detector_weights = path
    return report


def fetch_model(
    name: str,
    weights_dir: Path,
    *,
    sources: WeightSources | None = None,
    from_path: Path | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    verify: bool = True,
) -> list[FetchedFile]:
    """A single-file registry model (the Zhang models, Larsson ECCV16) into
    ``<weights_dir>/<model>/``: downloaded, or ``from_path`` (a copy brought by hand) checked and
    installed; a file that only exists in another framework is converted (Larsson's Caffe
    HDF5). Then the model is loaded strictly to prove the files usable (``verify``)."""
    from models.registry import get_model

    spec = get_model(name)
    sources = sources or WeightSources.default()
    remotes = sources.models.get(name)
    if not remotes:
        raise DownloadError(f"{name}: its files come in an archive; fetch-weights --model {name}")
    if from_path is not None and len(remotes) != 1:
        raise DownloadError(f"--from installs one file; {name} has {len(remotes)}")
    target = spec.folder(weights_dir)
    files: list[FetchedFile] = []
    for weight, remote in zip(spec.weights, remotes, strict=True):
        path = target / weight.filename
        if weight.converted_from is None:
            if from_path is not None:
                files.append(_install_local(from_path, remote, path))
            else:
                files.append(
                    fetch_single(remote, target, timeout=timeout, progress=progress, verify=None)
                )
            continue
        if from_path is None and path.is_file():
            files.append(FetchedFile(path, sha256_file(path), downloaded=False))
            continue
        source = from_path
        if source is None:  # the other framework's file, kept beside the converted one
            source = fetch_single(
                remote, target, timeout=timeout, progress=progress, verify=None
            ).path
        files.append(FetchedFile(path, _convert(weight, source, path), downloaded=True))
    if verify:
        _prove([f.path for f in files], lambda: spec.load(weights_dir), name)
    return files


def _convert(weight: WeightFile, source: Path, path: Path) -> str:
    """``source`` (another framework's file) to the product's state dict at ``path``; sha256."""
    from models.checkpoints import CheckpointError

    if weight.convert is None:
        raise DownloadError(f"no converter for {source.name}")
    try:
        return weight.convert(source, path)
    except CheckpointError as exc:
        raise DownloadError(str(exc)) from exc
