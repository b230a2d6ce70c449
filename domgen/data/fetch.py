"""The public datasets domgen knows, and how to download the ones that have a direct link.

``PUBLIC_DATASETS`` maps a key to where the data come from, its data card (``data_cards/<key>.md``) and a
suite snippet describing the fetched folder. ``fetch(key, dest)`` streams each file to ``<file>.part``,
verifies the published checksum (or records the computed sha256 in ``SHA256SUMS``), extracts archives
and moves the finished folder to ``dest/<key>`` in one ``os.replace``. Datasets behind a registration or
login have no URL: fetch says so and points at the card.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import textwrap
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from domgen.errors import DomgenError

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
CHECKSUM_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file; archives are extracted into ``into``, other files saved as ``into/save_as``."""

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    into: str = ""
    save_as: str | None = None

    @property
    def is_archive(self) -> bool:
        return self.filename.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class PublicDataset:
    key: str
    title: str
    homepage: str
    access: str
    suite_snippet: str
    files: tuple[RemoteFile, ...] = ()

    @property
    def card(self) -> str:
        return f"data_cards/{self.key}.md"

    @property
    def urls(self) -> list[str] | None:
        return [f.url for f in self.files] or None


def _snippet(text: str) -> str:
    return textwrap.dedent(text).strip("\n") + "\n"


_ZENODO_MA = "https://zenodo.org/records/3757476/files"
_FIGSHARE = "https://figshare.com/ndownloader/files"

PUBLIC_DATASETS: dict[str, PublicDataset] = {
    "covid19-ct-seg": PublicDataset(
        key="covid19-ct-seg",
        title="COVID-19 CT Lung and Infection Segmentation Dataset (Ma et al., 2020; 20 CT volumes)",
        homepage="https://zenodo.org/records/3757476",
        access="direct download from Zenodo (CC BY 4.0)",
        # sha256 values as verified by the torch_em dataset loaders (Zenodo itself publishes md5 only).
        files=(
            RemoteFile(f"{_ZENODO_MA}/COVID-19-CT-Seg_20cases.zip?download=1", "COVID-19-CT-Seg_20cases.zip",
                       sha256="a5060480eff9315b069b086312dac4872777901fb80d268a5a83edd9f4e7b440",
                       into="COVID-19-CT-Seg_20cases"),
            RemoteFile(f"{_ZENODO_MA}/Infection_Mask.zip?download=1", "Infection_Mask.zip",
                       sha256="87901c73fdd2230260e61d2dbc57bf56026efc28264006b8ea2bf411453c1694",
                       into="Infection_Mask"),
            RemoteFile(f"{_ZENODO_MA}/Lung_Mask.zip?download=1", "Lung_Mask.zip",
                       sha256="f060b0d0299939a6d95ddefdbfa281de1a779c4d230a5adbd32414711d6d8187",
                       into="Lung_Mask"),
            RemoteFile(f"{_ZENODO_MA}/Lung_and_Infection_Mask.zip?download=1", "Lung_and_Infection_Mask.zip",
                       sha256="34f5a573cb8fb53cb15abe81868395d9addf436854826a6fd6e70c2b294f19c3",
                       into="Lung_and_Infection_Mask"),
        ),
        suite_snippet=_snippet("""
            covid19-ct-seg:
              format: nifti
              root: <dest>/covid19-ct-seg
              images: COVID-19-CT-Seg_20cases
              lesions: Infection_Mask
              lungs: Lung_Mask            # 1 left / 2 right lung, merged to one lung mask
              intensity: hu               # the 10 radiopaedia_* volumes are stored windowed 0..255, not HU:
                                          # move them to their own folders and make them a second dataset
                                          # with intensity: {kind: windowed}
              patient_id: '^(?P<patient>.+)$'
              lesion_labels: {1: lesion}
              lesion_kind: covid
        """),
    ),
    "medseg-100": PublicDataset(
        key="medseg-100",
        title="MedSeg COVID-19 CT segmentation dataset: 100 axial slices of 40+ patients (SIRM / MedSeg)",
        homepage="http://medicalsegmentation.com/covid19/",
        access="direct download from figshare (images, masks) and Google Drive (updated lung masks)",
        files=(
            RemoteFile(f"{_FIGSHARE}/25953977", "tr_im.nii.gz", into="images", save_as="medseg100.nii.gz"),
            RemoteFile(f"{_FIGSHARE}/25953980", "tr_mask.nii.gz", into="masks", save_as="medseg100.nii.gz"),
            RemoteFile("https://drive.google.com/uc?export=download&id=1zj4N_KV0LBko1VSQ7FPZ38eaEGNU0K6-",
                       "tr_lungmasks_updated.nii.gz", into="lungs", save_as="medseg100.nii.gz"),
        ),
        suite_snippet=_snippet("""
            medseg-100:
              format: nifti
              root: <dest>/medseg-100
              images: images
              lesions: masks
              lungs: lungs
              intensity: hu
              patient_id: '^(?P<patient>medseg100)$'   # one volume of 100 slices from different patients
              lesion_labels: {1: ground_glass, 2: consolidation}
              ignore_labels: [3]          # 3 = pleural effusion: not a COVID lesion, read as background
              lesion_kind: covid
        """),
    ),
    "medseg-radiopaedia-9": PublicDataset(
        key="medseg-radiopaedia-9",
        title="MedSeg segmentation of 9 Radiopaedia COVID-19 CT volumes",
        homepage="http://medicalsegmentation.com/covid19/",
        access="direct download from figshare",
        files=(
            RemoteFile(f"{_FIGSHARE}/25954007", "rp_im.zip"),
            RemoteFile(f"{_FIGSHARE}/25954013", "rp_msk.zip"),
            RemoteFile(f"{_FIGSHARE}/25954010", "rp_lung_msk.zip"),
        ),
        suite_snippet=_snippet("""
            medseg-radiopaedia-9:
              format: nifti
              root: <dest>/medseg-radiopaedia-9
              images: rp_im
              lesions: rp_msk
              lungs: rp_lung_msk
              intensity: hu               # check with `domgen data check medseg-radiopaedia-9 --suite ...`: about -1000 in air
              patient_id: '^(?P<patient>\\d+)$'
              lesion_labels: {1: ground_glass, 2: consolidation}
              ignore_labels: [3]          # 3 = pleural effusion: not a COVID lesion, read as background
              lesion_kind: covid
        """),
    ),
    "covid-ct-rate": PublicDataset(
        key="covid-ct-rate",
        title="COVID-CT-Rate (Enshaei et al. 'Dataset B'): 433 slices / 82 patients, DICOM",
        homepage="https://figshare.com/articles/dataset/COVID-CT-Rate_zip/18339416",
        access="published on figshare as COVID-CT-Rate.zip without a stable direct file link",
        suite_snippet=_snippet("""
            covid-ct-rate:
              format: dicom
              root: <where you unpacked COVID-CT-Rate.zip>
              images: images              # one DICOM folder per patient
              lesions: masks              # <patient folder>.nii.gz lesion masks aligned with the sorted series
              intensity: hu
              patient_id: '^(?P<patient>.+)$'
              lesion_labels: {1: lesion}
              lesion_kind: covid
        """),
    ),
    "mosmeddata": PublicDataset(
        key="mosmeddata",
        title="MosMedData: chest CT scans with COVID-19 related findings (Morozov et al., 2020; 50 with masks)",
        homepage="https://mosmed.ai/datasets/covid19_1110/",
        access="distributed by mosmed.ai after accepting its licence form",
        suite_snippet=_snippet("""
            mosmeddata:
              format: nifti
              root: <where you put it>/COVID19_1110
              images: studies/CT-1        # rename masks/study_NNNN_mask.nii to study_NNNN.nii so stems match
              lesions: masks
              intensity: hu
              patient_id: '^(?P<patient>study_\\d+)$'
              lesion_labels: {1: lesion}
              lesion_kind: covid
        """),
    ),
    "covid19-20": PublicDataset(
        key="covid19-20",
        title="COVID-19 Lung CT Lesion Segmentation Challenge 2020 (MICCAI COVID-19-20; 199 training volumes)",
        homepage="https://covid-segmentation.grand-challenge.org/",
        access="released on grand-challenge.org to registered participants",
        suite_snippet=_snippet("""
            covid19-20:
              format: nifti
              root: <where you put it>
              images: ct                  # move *_ct.nii.gz here and *_seg.nii.gz to seg/, dropping the suffixes
              lesions: seg
              intensity: hu
              patient_id: '^(?P<patient>volume-covid19-[AB]-\\d+)$'
              lesion_labels: {1: lesion}
              lesion_kind: covid
        """),
    ),
    "msd-task06-lung": PublicDataset(
        key="msd-task06-lung",
        title="Medical Segmentation Decathlon Task06 Lung: non-small-cell lung tumours (64 training volumes)",
        homepage="http://medicaldecathlon.com/",
        access="direct download of Task06_Lung.tar from the MSD mirror used by MONAI (CC BY-SA 4.0)",
        # md5 as published with monai.apps.DecathlonDataset.
        files=(
            RemoteFile("https://msd-for-monai.s3-us-west-2.amazonaws.com/Task06_Lung.tar", "Task06_Lung.tar",
                       md5="8afd997733c7fc0432f71255ba4e52dc"),
        ),
        suite_snippet=_snippet("""
            msd-task06-lung:
              format: nifti
              root: <dest>/msd-task06-lung/Task06_Lung   # its ._* macOS files are hidden and skipped
              images: imagesTr
              lesions: labelsTr
              intensity: hu
              patient_id: '^(?P<patient>lung_\\d+)$'
              lesion_labels: {1: tumour}
              lesion_kind: tumour
        """),
    ),
    "structseg2019": PublicDataset(
        key="structseg2019",
        title="StructSeg 2019 Task 3: lung cancer gross target volume segmentation (50 CT volumes)",
        homepage="https://structseg2019.grand-challenge.org/",
        access="released on grand-challenge.org to registered participants",
        suite_snippet=_snippet("""
            structseg2019:
              format: nifti
              root: <where you put it>
              images: images              # copy <n>/data.nii.gz to images/<n>.nii.gz and label.nii.gz to masks/<n>.nii.gz
              lesions: masks
              intensity: hu
              patient_id: '^(?P<patient>\\d+)$'
              lesion_labels: {1: tumour}
              lesion_kind: tumour
        """),
    ),
    "nsclc-radiomics-effusion": PublicDataset(
        key="nsclc-radiomics-effusion",
        title="NSCLC-Radiomics CT with pleural effusion segmentations (PleThora, Kiser et al., 2020; TCIA)",
        homepage="https://www.cancerimagingarchive.net/analysis-result/plethora/",
        access="images come from TCIA through the NBIA Data Retriever, which cannot be scripted with a plain URL",
        suite_snippet=_snippet("""
            nsclc-radiomics-effusion:
              format: dicom
              root: <where you put it>
              images: dicom               # one CT series folder per patient, e.g. dicom/LUNG1-001/
              lesions: effusion           # effusion/LUNG1-001.nii.gz aligned with the sorted series
              intensity: hu
              patient_id: '^(?P<patient>LUNG1-\\d+)$'
              lesion_labels: {1: effusion}
              lesion_kind: effusion
        """),
    ),
}


def get_public_dataset(name: str) -> PublicDataset:
    try:
        return PUBLIC_DATASETS[name]
    except KeyError:
        raise DomgenError(
            f"unknown public dataset '{name}'; known: {', '.join(sorted(PUBLIC_DATASETS))}"
        ) from None


def _host(url: str) -> str:
    return urllib.parse.urlparse(url).netloc or url


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


def _offline(name: str, url: str, card: str) -> DomgenError:
    return DomgenError(
        f"could not download {name} from {_host(url)} (no network); download it by hand as described in "
        f"{card} and point a suite file at it"
    )


def download(
    url: str,
    path: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    name: str | None = None,
    card: str = "the dataset's data card",
    progress: bool = True,
) -> str:
    """Stream ``url`` to ``path`` (via ``path.part``), verify the checksum(s) and return the sha256."""
    from tqdm import tqdm

    name = name or path.name
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    digest_sha256, digest_md5 = hashlib.sha256(), hashlib.md5()
    try:
        try:
            response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise DomgenError(
                f"could not download {name} from {_host(url)} (HTTP {exc.code} {exc.reason}); download it by "
                f"hand as described in {card} and point a suite file at it"
            ) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            if urllib.parse.urlparse(url).scheme == "file":
                raise DomgenError(f"could not read {url} for {name} ({_reason(exc)}); check the file path") from None
            raise _offline(name, url, card) from None
        with response:
            content_type = (response.headers.get("Content-Type") or "").lower()
            if content_type.startswith("text/html") and not path.name.lower().endswith((".html", ".htm")):
                raise DomgenError(
                    f"{_host(url)} sent a web page instead of {path.name} (it probably asks for a login or a "
                    f"confirmation); download {name} by hand as described in {card}"
                )
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(part, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, desc=path.name, disable=not progress, leave=False
            ) as bar:
                while True:
                    try:
                        chunk = response.read(CHUNK_BYTES)
                    except (socket.timeout, ConnectionError, OSError):
                        raise _offline(name, url, card) from None
                    if not chunk:
                        break
                    out.write(chunk)
                    digest_sha256.update(chunk)
                    digest_md5.update(chunk)
                    bar.update(len(chunk))
        for kind, expected, got in (("sha256", sha256, digest_sha256), ("md5", md5, digest_md5)):
            if expected is not None and got.hexdigest().lower() != expected.lower():
                raise DomgenError(
                    f"checksum mismatch for {path.name} of {name} from {_host(url)} ({kind} {got.hexdigest()}, "
                    f"expected {expected}); the download is corrupt or the file changed, so it was deleted: try "
                    f"again or download it by hand as described in {card}"
                )
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return digest_sha256.hexdigest()


def extract_archive(archive: Path, into: Path) -> None:
    """Extract a zip or tar archive into ``into`` (refusing members that would land outside it)."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(into)  # zipfile drops absolute paths and '..' components itself
        else:
            with tarfile.open(archive, "r:*") as bundle:
                bundle.extractall(into, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise DomgenError(
            f"cannot extract {archive} ({type(exc).__name__}: {exc}); the archive is corrupt, download it again"
        ) from None


def _files_for(dataset: PublicDataset, url_override: str | None) -> tuple[RemoteFile, ...]:
    if url_override is None:
        return dataset.files
    if url_override.endswith("/"):
        # A mirror folder: same file names (and checksums) under another base URL.
        return tuple(replace(f, url=url_override + f.filename) for f in dataset.files)
    filename = Path(urllib.parse.urlparse(url_override).path).name or dataset.key
    known = {f.filename: f for f in dataset.files}
    if filename in known:
        return (replace(known[filename], url=url_override),)
    return (RemoteFile(url_override, filename),)


def fetch(name: str, dest: Path, url_override: str | None = None, progress: bool = True) -> Path:
    """Download public dataset ``name`` into ``dest/<name>`` and return that folder.

    ``url_override`` is one file's URL, or a mirror folder ending in ``/`` holding the usual file names.
    An existing ``dest/<name>`` is returned as it is.
    """
    dataset = get_public_dataset(name)
    files = _files_for(dataset, url_override)
    if not files:
        raise DomgenError(
            f"{dataset.title} has no direct download ({dataset.access}); download it by hand as described in "
            f"{dataset.card} and point a suite file at it"
        )
    dest = Path(dest).expanduser()
    target = dest / dataset.key
    if target.is_dir() and any(target.iterdir()):
        return target
    staging = dest / f".{dataset.key}.part"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        sums = []
        for remote in files:
            folder = staging / remote.into
            folder.mkdir(parents=True, exist_ok=True)
            downloaded = folder / (remote.save_as if remote.save_as and not remote.is_archive else remote.filename)
            sha = download(
                remote.url, downloaded, sha256=remote.sha256, md5=remote.md5, name=name, card=dataset.card,
                progress=progress,
            )
            sums.append(f"{sha}  {remote.filename}\n")
            if remote.is_archive:
                extract_archive(downloaded, folder)
                downloaded.unlink()
        # The computed sha256 of every download, so a later copy can be checked against this one.
        (staging / CHECKSUM_FILE).write_text("".join(sums), encoding="utf-8")
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
