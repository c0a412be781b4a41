import zipfile

import numpy as np
import pytest

from fklip.data.archive import (
    ArchiveWriter,
    ImageArchive,
    model_input_from_batch,
    normalized_from_pixels,
    pixels_from_normalized,
)
from fklip.errors import DataError


def _float_images(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {str(100 + i): rng.standard_normal((3, size, size)).astype(np.float32) for i in range(n)}


@pytest.mark.parametrize("compressed", [False, True])
def test_reads_the_originals_npz(tmp_path, compressed):
    images = _float_images(7)
    path = tmp_path / "val.8.npz"
    (np.savez_compressed if compressed else np.savez)(path, **images)
    with ImageArchive(path) as archive:
        assert archive.ids == list(images)  # archive order = savez order
        assert archive.encoding == "float32_chw" and (archive.height, archive.width) == (8, 8)
        assert (archive._mmap is None) == compressed  # uncompressed members are memory-mapped
        for key, value in images.items():
            np.testing.assert_array_equal(archive.read(key), value)
        assert 101 in archive and "101" in archive and "999" not in archive  # ids compared as strings
        batch = archive.read_batch([103, "100"])
        np.testing.assert_array_equal(batch, np.stack([images["103"], images["100"]]))
        chunks = list(archive.iter_batches(3))
        assert [len(ids) for ids, _ in chunks] == [3, 3, 1]
        assert chunks[0][1].shape == (3, 3, 8, 8)


def test_writer_is_deterministic_and_readable_by_numpy(tmp_path):
    images = {k: pixels_from_normalized(v) for k, v in _float_images(4).items()}
    for name in ("a.npz", "b.npz"):
        with ArchiveWriter(tmp_path / name) as w:
            for k, v in images.items():
                w.add(k, v)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz") as z:
        assert z.files == list(images)
        np.testing.assert_array_equal(z["101"], images["101"])
    with ImageArchive(tmp_path / "a.npz") as archive:
        assert archive.encoding == "uint8_hwc"
        assert archive.image_shape == (8, 8, 3)


def test_writer_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.npz"
    with pytest.raises(DataError, match="'2'.*expected float32"):
        with ArchiveWriter(path) as w:
            w.add("1", np.zeros((4, 4, 3), np.uint8))
            w.add("2", np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="written twice"):
        with ArchiveWriter(path) as w:
            w.add("1", np.zeros((4, 4, 3), np.uint8))
            w.add(1, np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_uint8_normalisation_matches_the_originals_recipe(tmp_path):
    import torch

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(2, 6, 5, 3), dtype=np.uint8)
    expected = np.stack([normalized_from_pixels(p) for p in pixels])
    # the original: ToTensor (x / 255) then Normalize(mean, std), on (3, H, W)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    oracle = torch.stack([(torch.from_numpy(p).permute(2, 0, 1).float() / 255 - mean) / std for p in pixels])
    got = model_input_from_batch(pixels, "uint8_hwc")
    assert got.shape == (2, 3, 6, 5)
    torch.testing.assert_close(got, oracle, rtol=0, atol=1e-6)
    np.testing.assert_allclose(expected, oracle.numpy(), atol=1e-6)
    # float32 archives pass through untouched
    assert model_input_from_batch(expected, "float32_chw").data_ptr() is not None
    torch.testing.assert_close(model_input_from_batch(expected, "float32_chw"), torch.from_numpy(expected))
    # and the uint8 encoding round-trips the float one within a pixel step
    back = normalized_from_pixels(pixels_from_normalized(expected[0]))
    np.testing.assert_allclose(back, expected[0], atol=1e-5)


def test_bad_arrays_name_the_key(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, a=np.zeros((3, 8, 8), np.float32), b=np.zeros((3, 8, 8), np.float64),
             c=np.zeros((3, 4, 4), np.float32), d=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError) as e:
        ImageArchive(path)
    msg = str(e.value)
    assert "3 problems" in msg
    assert "key 'b': float64" in msg
    assert "key 'c': float32_chw 4x4, but key 'a' is float32_chw 8x8" in msg
    assert "key 'd': uint8_hwc" in msg


def test_missing_ids_report_count_and_first_few(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, **_float_images(3))
    with ImageArchive(path) as archive:
        archive.require(["100", 101], "train.jsonl")
        wanted = ["100"] + [str(i) for i in range(500, 520)] + ["500"]
        assert archive.missing(wanted)[:2] == ["500", "501"] and len(archive.missing(wanted)) == 20
        with pytest.raises(DataError, match=r"20 image ids from train\.jsonl are not in the archive, "
                                            r"first: '500', '501', '502', '503', '504', \.\.\. \(15 more\)"):
            archive.require(wanted, "train.jsonl")
        with pytest.raises(DataError, match="no image with id 7"):
            archive.read(7)


def test_image_size_check(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, **_float_images(2, size=32))
    with ImageArchive(path) as archive:
        archive.check_image_size(32, "x")
        with pytest.raises(DataError, match="images are 32x32 but model ViT-B-32 expects 224x224"):
            archive.check_image_size(224, "ViT-B-32")


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"none\.npz: no such file; expected an image archive"):
        ImageArchive(tmp_path / "none.npz")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(DataError, match=r"dir\.npz: is a directory; expected an image archive"):
        ImageArchive(tmp_path / "dir.npz")
    with pytest.raises(DataError, match=r"/dev/null: is not a regular file \(a character device\)"):
        ImageArchive("/dev/null")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not an .npz archive"):
        ImageArchive(junk)
    empty = tmp_path / "empty.npz"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(DataError, match="holds no images"):
        ImageArchive(empty)
    other = tmp_path / "other.npz"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "hi")
        z.writestr("x.npy", b"garbage")
    with pytest.raises(DataError) as e:
        ImageArchive(other)
    assert "'readme.txt' is not a .npy array" in str(e.value)
    assert "key 'x': unreadable array" in str(e.value)


def test_archive_is_not_read_whole(tmp_path):
    """Opening touches headers only: reading one image must not materialise the others."""
    images = {str(i): np.full((3, 16, 16), i, np.float32) for i in range(64)}
    path = tmp_path / "a.npz"
    np.savez(path, **images)
    with ImageArchive(path) as archive:
        view = archive.read("5")
        assert isinstance(view.base, np.memmap) or isinstance(view.base, np.ndarray)
        assert not view.flags.owndata  # a view into the mapped file, not a copy
        assert float(view[0, 0, 0]) == 5.0


@pytest.mark.parametrize("layout", ["in_order", "shuffled", "repeats", "mixed_id_lengths", "fortran", "compressed"])
def test_read_batch_equals_one_image_at_a_time(tmp_path, layout):
    """read_batch copies evenly spaced runs of members straight from the memory map; whatever the
    order, repeats, member spacing or member layout, it must equal stacking `read` one by one."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(37, 6, 5, 3), dtype=np.uint8)
    ids = [str(i) if layout == "mixed_id_lengths" else str(1000 + i) for i in range(0, 37 * 97, 97)]
    path = tmp_path / "a.npz"
    if layout in ("fortran", "compressed"):
        arrays = {k: (np.asfortranarray(x) if layout == "fortran" else x) for k, x in zip(ids, images)}
        (np.savez_compressed if layout == "compressed" else np.savez)(path, **arrays)
    else:
        with ArchiveWriter(path) as w:
            for k, x in zip(ids, images):
                w.add(k, x)
    order = {"shuffled": list(rng.permutation(ids)), "repeats": ids[:5] + ids[:5] + ids[::-3]}.get(layout, ids)
    with ImageArchive(path) as archive:
        want = np.stack([archive.read(i) for i in order])
        assert np.array_equal(archive.read_batch(order), want)
        out = np.full((len(order) + 3, 6, 5, 3), 7, np.uint8)
        got = archive.read_batch(order, out=out)
        assert np.array_equal(got, want) and np.all(out[len(order):] == 7)
        with pytest.raises(DataError, match="no image with id 'nope'"):
            archive.read_batch([order[0], "nope"])
