"""Downloading public datasets, tested on local file:// URLs (never the network)."""
from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from domgen.data import fetch as fetch_module
from domgen.data.fetch import PUBLIC_DATASETS, PublicDataset, RemoteFile, download, fetch
from domgen.data.spec import parse_suite
from domgen.errors import DomgenError

EXPECTED_KEYS = {
    "covid19-ct-seg", "medseg-100", "medseg-radiopaedia-9", "covid-ct-rate", "mosmeddata", "covid19-20",
    "msd-task06-lung", "structseg2019", "nsclc-radiomics-effusion",
}


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(monkeypatch, *files: RemoteFile, key: str = "toy") -> None:
    monkeypatch.setitem(
        PUBLIC_DATASETS, key,
        PublicDataset(key=key, title="Toy data", homepage="file://", access="local", suite_snippet="", files=files),
    )


def test_fetch_zip_with_good_checksum(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "images.zip", {"a/one.txt": b"one", "two.txt": b"two"})
    plain = tmp_path / "tr_im.bin"
    plain.write_bytes(b"volume")
    register(
        monkeypatch,
        RemoteFile(archive.as_uri(), "images.zip", sha256=sha256_of(archive), into="imgs"),
        RemoteFile(plain.as_uri(), "tr_im.bin", md5=hashlib.md5(b"volume").hexdigest(), into="images",
                   save_as="toy.bin"),
    )
    target = fetch("toy", tmp_path / "dest", progress=False)
    assert target == tmp_path / "dest" / "toy"
    assert (target / "imgs" / "a" / "one.txt").read_bytes() == b"one"
    assert (target / "imgs" / "two.txt").read_bytes() == b"two"
    assert not (target / "imgs" / "images.zip").exists()  # archive removed after extraction
    assert (target / "images" / "toy.bin").read_bytes() == b"volume"
    sums = (target / "SHA256SUMS").read_text().splitlines()
    assert sums == [f"{sha256_of(archive)}  images.zip", f"{hashlib.sha256(b'volume').hexdigest()}  tr_im.bin"]
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["toy"]  # no staging or .part left
    # A second fetch finds the folder and downloads nothing (the source is gone).
    archive.unlink()
    assert fetch("toy", tmp_path / "dest", progress=False) == target


def test_bad_checksum_deletes_the_download_and_raises(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "x.zip", {"f.txt": b"data"})
    register(monkeypatch, RemoteFile(archive.as_uri(), "x.zip", sha256="0" * 64))
    with pytest.raises(DomgenError, match=r"checksum mismatch for x\.zip of toy.*expected 0000.*deleted"):
        fetch("toy", tmp_path / "dest", progress=False)
    assert list((tmp_path / "dest").iterdir()) == []
    register(monkeypatch, RemoteFile(archive.as_uri(), "x.zip", md5="f" * 32))
    with pytest.raises(DomgenError, match=r"md5"):
        fetch("toy", tmp_path / "dest", progress=False)


def test_unknown_checksum_is_recorded(tmp_path, monkeypatch):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as bundle:
        info = tarfile.TarInfo("Task/imagesTr/lung_001.txt")
        info.size = 3
        bundle.addfile(info, io.BytesIO(b"abc"))
    archive = tmp_path / "Task.tar.gz"
    archive.write_bytes(payload.getvalue())
    register(monkeypatch, RemoteFile(archive.as_uri(), "Task.tar.gz"))
    target = fetch("toy", tmp_path / "dest", progress=False)
    assert (target / "Task" / "imagesTr" / "lung_001.txt").read_bytes() == b"abc"
    assert (target / "SHA256SUMS").read_text() == f"{hashlib.sha256(payload.getvalue()).hexdigest()}  Task.tar.gz\n"


def test_url_override_single_file_and_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    archive = make_zip(mirror / "x.zip", {"f.txt": b"data"})
    register(monkeypatch, RemoteFile("https://unused.invalid/x.zip", "x.zip", sha256=sha256_of(archive)))
    target = fetch("toy", tmp_path / "a", url_override=mirror.as_uri() + "/", progress=False)
    assert (target / "f.txt").read_bytes() == b"data"
    # An overriding URL with a known file name keeps that file's checksum.
    register(monkeypatch, RemoteFile("https://unused.invalid/x.zip", "x.zip", sha256="1" * 64))
    with pytest.raises(DomgenError, match="checksum mismatch"):
        fetch("toy", tmp_path / "b", url_override=archive.as_uri(), progress=False)


def test_offline_download_says_what_to_do(tmp_path):
    with pytest.raises(DomgenError) as raised:
        fetch("covid19-ct-seg", tmp_path, url_override="http://127.0.0.1:9/x.zip", progress=False)
    assert str(raised.value) == (
        "could not download covid19-ct-seg from 127.0.0.1:9 (no network); download it by hand as described "
        "in data_cards/covid19-ct-seg.md and point a suite file at it"
    )
    assert list(tmp_path.iterdir()) == []


def test_registration_only_dataset_points_to_card(tmp_path):
    with pytest.raises(DomgenError, match=r"no direct download .*data_cards/mosmeddata\.md"):
        fetch("mosmeddata", tmp_path)


def test_unknown_dataset_lists_known(tmp_path):
    with pytest.raises(DomgenError, match="unknown public dataset 'nope'; known: covid-ct-rate, covid19-20"):
        fetch("nope", tmp_path)


def test_web_page_instead_of_file_is_refused(tmp_path):
    page = tmp_path / "login.html"
    page.write_text("<html>please sign in</html>")
    with pytest.raises(DomgenError, match=r"sent a web page instead of data\.zip"):
        download(page.as_uri(), tmp_path / "data.zip", progress=False)
    assert not (tmp_path / "data.zip").exists() and not (tmp_path / "data.zip.part").exists()


def test_download_returns_sha256_and_missing_local_file(tmp_path):
    source = tmp_path / "blob.bin"
    source.write_bytes(b"x" * (3 * fetch_module.CHUNK_BYTES + 5))  # several chunks
    assert download(source.as_uri(), tmp_path / "out" / "blob.bin", progress=False) == sha256_of(source)
    assert (tmp_path / "out" / "blob.bin").read_bytes() == source.read_bytes()
    with pytest.raises(DomgenError, match="could not read file://.*missing.bin"):
        download((tmp_path / "missing.bin").as_uri(), tmp_path / "m.bin", progress=False)


def test_corrupt_archive(tmp_path, monkeypatch):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK not really a zip")
    register(monkeypatch, RemoteFile(bad.as_uri(), "bad.zip"))
    with pytest.raises(DomgenError, match=r"cannot extract .*bad\.zip"):
        fetch("toy", tmp_path / "dest", progress=False)
    assert list((tmp_path / "dest").iterdir()) == []


def test_registry_entries_are_complete_and_snippets_parse(tmp_path):
    assert EXPECTED_KEYS <= set(PUBLIC_DATASETS)
    ma = PUBLIC_DATASETS["covid19-ct-seg"]
    assert {f.filename for f in ma.files} == {
        "COVID-19-CT-Seg_20cases.zip", "Infection_Mask.zip", "Lung_Mask.zip", "Lung_and_Infection_Mask.zip"}
    assert all("3757476" in url for url in ma.urls)
    assert {f.filename for f in PUBLIC_DATASETS["medseg-100"].files} == {
        "tr_im.nii.gz", "tr_mask.nii.gz", "tr_lungmasks_updated.nii.gz"}
    assert {f.filename for f in PUBLIC_DATASETS["medseg-radiopaedia-9"].files} == {
        "rp_im.zip", "rp_msk.zip", "rp_lung_msk.zip"}
    assert [f.filename for f in PUBLIC_DATASETS["msd-task06-lung"].files] == ["Task06_Lung.tar"]
    for key, entry in PUBLIC_DATASETS.items():
        assert entry.key == key and entry.card == f"data_cards/{key}.md" and entry.title
        for remote in entry.files:
            assert remote.url.startswith("https://")
            assert remote.sha256 is None or len(remote.sha256) == 64
            assert remote.md5 is None or len(remote.md5) == 32
        # Each snippet is a valid suite entry once placed under 'datasets:'.
        suite = tmp_path / f"{key}.yaml"
        suite.write_text(yaml.safe_dump({"datasets": yaml.safe_load(entry.suite_snippet)}))
        assert parse_suite(suite).get(key).format in ("nifti", "dicom", "slices")
