"""ResultStore: the directory of job inputs (photos) and results (MP4s)."""

from __future__ import annotations

import pytest

from serving.jobs.results import ResultStore


@pytest.fixture
def results(tmp_path):
    return ResultStore(str(tmp_path / "results"))


def test_creates_its_directories(tmp_path):
    root = tmp_path / "deep" / "results"
    store = ResultStore(str(root))
    assert store.root == root
    assert (root / "inputs").is_dir()
    ResultStore(str(root))  # opening an existing directory again is fine
    assert (root / "inputs").is_dir()


def test_save_and_load_input_round_trip(results):
    photo = bytes(range(256)) * 64 + b"\x00\xff"
    results.save_input("video_abc", "photo", photo)
    assert results.load_input("video_abc", "photo") == photo
    folder = results.root / "inputs" / "video_abc"
    assert sorted(p.name for p in folder.iterdir()) == ["photo"]  # no partial file left behind


def test_save_input_overwrites(results):
    results.save_input("video_abc", "photo", b"first")
    results.save_input("video_abc", "photo", b"second, longer")
    assert results.load_input("video_abc", "photo") == b"second, longer"
    results.save_input("video_empty", "photo", b"")
    assert results.load_input("video_empty", "photo") == b""


def test_inputs_are_kept_apart_per_job(results):
    results.save_input("video_a", "photo", b"photo a")
    results.save_input("video_b", "photo", b"photo b")
    assert results.load_input("video_a", "photo") == b"photo a"
    assert results.load_input("video_b", "photo") == b"photo b"


def test_load_missing_input_raises(results):
    with pytest.raises(FileNotFoundError):
        results.load_input("video_missing", "photo")


def test_video_path_is_under_root(results):
    path = results.video_path("video_abc")
    assert path.parent == results.root
    assert path.name == "video_abc.mp4"
    assert not path.exists()  # only a location; the muxer writes it


def test_remove_deletes_video_and_input(results):
    results.save_input("video_abc", "photo", b"photo")
    results.video_path("video_abc").write_bytes(b"mp4 bytes")
    results.save_input("video_other", "photo", b"other photo")
    results.video_path("video_other").write_bytes(b"other mp4")

    results.remove("video_abc")
    assert not results.video_path("video_abc").exists()
    assert not (results.root / "inputs" / "video_abc").exists()
    with pytest.raises(FileNotFoundError):
        results.load_input("video_abc", "photo")
    # another job's files are untouched
    assert results.load_input("video_other", "photo") == b"other photo"
    assert results.video_path("video_other").read_bytes() == b"other mp4"


def test_remove_missing_files_is_fine(results):
    results.remove("video_never_existed")  # neither file exists
    results.video_path("video_only_video").write_bytes(b"mp4")
    results.remove("video_only_video")  # no input
    assert not results.video_path("video_only_video").exists()
    results.save_input("video_only_input", "photo", b"photo")
    results.remove("video_only_input")  # no video
    assert not (results.root / "inputs" / "video_only_input").exists()
    results.remove("video_only_input")  # twice
    assert (results.root / "inputs").is_dir()


def test_input_names_are_never_paths(results):
    for name in ("../x", "a/b", "", "Photo", "x" * 40, "photo\x00"):
        with pytest.raises(ValueError, match="not an input name"):
            results.save_input("video_abc", name, b"data")
