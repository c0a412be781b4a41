"""Every runner against the plain PyTorch path, through the batched pipeline.

The oracle is plain open_clip written out here (`plain_images`, `plain_texts`: `model.encode_image`
on the normalised pixels, `model.encode_text` over the full context, batch by batch), not fklip's
own encoding code.

fklip-tiny everywhere (two exports: float32 pixels with int32 ids, uint8 pixels with int64 ids,
both with a max batch of 16 so that a batch of 64 is split); ViT-B-32 with random weights in the
slow tests. Backends that cannot run here (TensorRT without a GPU) skip with the reason.
"""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from engines.base import BACKENDS, build_runner
from fklip import pipeline
from fklip.config import EncodeConfig
from fklip.errors import ConfigError, DataError, FklipError, MissingDependencyError
from fklip.runner import tokenizer_for

BATCH_SIZES = (1, 7, 64)
N_IMAGES = 70  # not a multiple of any batch size, and more than one max batch (16)
WORDS = ["red", "blue", "black", "white", "cotton", "silk", "wool", "t-shirt", "dress", "jacket", "coat",
         "skirt", "jeans", "with", "long", "short", "sleeves", "collar", "striped", "floral"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU; torch sees none")


def plain_images(model, archive, batch: int, device: str = "cpu", precision: str = "fp32", image_ids=None):
    """The slow oracle: open_clip's `encode_image` on each batch's CLIP-normalised pixels."""
    import torch

    with torch.no_grad():
        return _plain_images(model, archive, batch, device, precision, image_ids)


def _plain_images(model, archive, batch, device, precision, image_ids):
    import torch
    import torch.nn.functional as F

    from fklip.data.archive import CLIP_MEAN, CLIP_STD

    ids = list(archive.ids if image_ids is None else image_ids)
    dtype = next(model.parameters()).dtype
    out = []
    for start in range(0, len(ids), batch):
        x = torch.from_numpy(np.array(archive.read_batch(ids[start:start + batch])))
        if x.dtype == torch.uint8:  # (B, H, W, 3) pixels -> (B, 3, H, W), normalised
            x = x.permute(0, 3, 1, 2).float() / 255
            x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        with _plain_autocast(precision, device):
            emb = model.encode_image(x.to(device, dtype))
        out.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def plain_texts(model, tokenizer, texts, batch: int, device: str = "cpu", precision: str = "fp32"):
    """The slow oracle: open_clip's `encode_text` over the full context, batch by batch."""
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(texts), batch):
        with _plain_autocast(precision, device), torch.no_grad():
            emb = model.encode_text(tokenizer(texts[start:start + batch]).to(device))
        out.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def _plain_autocast(precision: str, device: str):
    import contextlib

    import torch

    if precision != "amp":
        return contextlib.nullcontext()
    cuda = device.startswith("cuda")
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.bfloat16)


def _plain_model(checkpoint, device: str = "cpu", precision: str = "fp32"):
    import torch

    from fklip.model import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model.to(device).eval()
    if precision in ("bf16", "fp16"):
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    return ckpt, model


def _skip_unless_trt() -> None:
    pytest.importorskip("tensorrt", reason="the trt engine needs tensorrt")
    if not _cuda():
        pytest.skip("the trt engine needs a CUDA GPU; torch sees none")


# backend -> (how to skip where it cannot run, its EncodeConfig from (checkpoint, export folder))
CASES = {
    "torch": (lambda: None, lambda ckpt, export: EncodeConfig("torch", checkpoint=ckpt)),
    "onnx": (lambda: None, lambda ckpt, export: EncodeConfig("onnx", engine_dir=export)),
    "trt": (_skip_unless_trt, lambda ckpt, export: EncodeConfig("trt", engine_dir=export, device="cuda")),
}


# (backend, export): the torch engine runs the checkpoint, so one export variant is enough for it
BACKEND_GRAPHS = [(b, g) for b in sorted(BACKENDS) for g in ("float", "uint8") if (b, g) != ("torch", "uint8")]


def _case(backend: str, ckpt, export) -> EncodeConfig:
    skip, cfg = CASES[backend]
    skip()
    return cfg(ckpt, export)


def _export(checkpoint, out, **kw) -> dict:
    from export.pipeline import run_export
    from fklip.config import ExportConfig

    return run_export(ExportConfig(checkpoint=checkpoint, out=out, **kw))


def _texts(n: int, seed: int = 0) -> list[str]:
    """Captions of 0 to 12 words, and one longer than the context (truncated), in the middle."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(0, 13)))) for _ in range(n)]
    texts[n // 2] = " ".join(["striped"] * 100)
    return texts


def _write_archives(folder, n: int, size: int, seed: int = 0) -> dict:
    """The same images as uint8 pixels and as float32 CLIP-normalised arrays, ids out of order."""
    from fklip.data.archive import ArchiveWriter, normalized_from_pixels

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    paths = {"uint8_hwc": folder / "images.uint8.npz", "float32_chw": folder / "images.float.npz"}
    for encoding, path in paths.items():
        with ArchiveWriter(path) as w:
            for i, p in enumerate(pixels):
                w.add(str(5000 - 3 * i), p if encoding == "uint8_hwc" else normalized_from_pixels(p))
    return paths


def assert_within(got: np.ndarray, ref: np.ndarray, tol: dict) -> None:
    """Every row's cosine and every element's difference within a manifest tolerance."""
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.isfinite(got).all()
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= tol["min_cosine"], f"min cosine {cos.min()} < {tol['min_cosine']}"
    assert np.abs(got - ref).max() <= tol["max_abs"], f"max abs {np.abs(got - ref).max()} > {tol['max_abs']}"


def _tolerance(export, tower: str, section: str = "towers") -> dict:
    from export.manifest import ExportManifest

    manifest = ExportManifest.read(export, verify=False)
    entries = manifest.towers if section == "towers" else manifest.int8
    return entries[tower].parity.tolerance.as_dict()


# ---- fixtures: one checkpoint, two exports, two archives, the plain oracle


@pytest.fixture(scope="module")
def tiny_exports(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    _export(tiny_checkpoint, root / "float", int8=True, opt_batch=8, max_batch=16)
    _export(tiny_checkpoint, root / "uint8", uint8_input=True, ids_dtype="int64", opt_batch=8, max_batch=16)
    return {"float": root / "float", "uint8": root / "uint8"}


@pytest.fixture(scope="module")
def tiny_archives(tiny_spec, tmp_path_factory):
    return _write_archives(tmp_path_factory.mktemp("archives"), N_IMAGES, tiny_spec.image_size)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tiny_archives):
    """The plain PyTorch oracle on the checkpoint: features per archive encoding, and of texts."""
    from fklip.data.archive import ImageArchive
    from fklip.model import build_tokenizer

    ckpt, model = _plain_model(tiny_checkpoint)
    out = {}
    for encoding, path in tiny_archives.items():
        with ImageArchive(path) as archive:
            out[encoding] = plain_images(model, archive, 256)
    out["texts"] = plain_texts(model, build_tokenizer(ckpt.spec), _texts(N_IMAGES), 256)
    return out


def test_model_runner_reads_ahead_to_the_plain_features(tiny_checkpoint, tiny_archives, reference, monkeypatch):
    """fklip.encode (ModelRunner through the pipeline, what the knowledge refresh runs): the next
    batches are read in a background thread; the features are the plain oracle's, both encodings."""
    import threading

    from fklip.data.archive import ImageArchive
    from fklip.encode import encode_archive, encode_texts
    from fklip.model import build_tokenizer

    ckpt, model = _plain_model(tiny_checkpoint)
    for encoding, path in tiny_archives.items():
        with ImageArchive(path) as archive:  # batch 16: several batches, a partial last one
            readers, read = [], archive.read_batch
            monkeypatch.setattr(archive, "read_batch", lambda *a, readers=readers, read=read, **k: readers.append(
                threading.current_thread().name) or read(*a, **k))
            got = encode_archive(model, archive, 16)
        assert readers == ["fklip-batches"] * -(-N_IMAGES // 16)  # every batch read in the background
        assert_within(got, reference[encoding], {"min_cosine": 0.99999, "max_abs": 1e-6})
    texts = encode_texts(model, build_tokenizer(ckpt.spec), _texts(N_IMAGES), 16)
    assert_within(texts, reference["texts"], {"min_cosine": 0.99999, "max_abs": 1e-6})


def test_every_backend_has_a_case():
    """STYLE principle 5: a registered backend without a test case fails here."""
    assert set(CASES) == set(BACKENDS)


# ---- agreement with the plain PyTorch path


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("encoding", ["float32_chw", "uint8_hwc"])  # the archive's
@pytest.mark.parametrize(("backend", "graph"), BACKEND_GRAPHS)  # graph: float32 or uint8 pixels
def test_images_match_torch(backend, graph, encoding, batch_size, tiny_checkpoint, tiny_exports,
                            tiny_archives, reference):
    from fklip.data.archive import ImageArchive

    export = tiny_exports[graph]
    with build_runner(_case(backend, tiny_checkpoint, export)) as runner, ImageArchive(tiny_archives[encoding]) as archive:
        got = pipeline.encode_archive(runner, archive, batch_size)
    assert_within(got, reference[encoding], _tolerance(export, "image"))


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize(("backend", "graph"), BACKEND_GRAPHS)  # graph: int32 or int64 ids
def test_texts_match_torch(backend, graph, batch_size, tiny_checkpoint, tiny_exports, reference):
    export = tiny_exports[graph]
    with build_runner(_case(backend, tiny_checkpoint, export)) as runner:
        got = pipeline.encode_texts(runner, tokenizer_for(runner), _texts(N_IMAGES), batch_size)
    assert_within(got, reference["texts"], _tolerance(export, "text"))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_results_do_not_depend_on_the_batch_size(backend, tiny_checkpoint, tiny_exports, tiny_archives):
    from fklip.data.archive import ImageArchive

    with build_runner(_case(backend, tiny_checkpoint, tiny_exports["float"])) as runner, \
            ImageArchive(tiny_archives["uint8_hwc"]) as archive:
        tokenizer = tokenizer_for(runner)
        images = [pipeline.encode_archive(runner, archive, b) for b in BATCH_SIZES]
        texts = [pipeline.encode_texts(runner, tokenizer, _texts(N_IMAGES), b) for b in BATCH_SIZES]
    for got in images[1:]:
        np.testing.assert_allclose(got, images[0], rtol=0, atol=1e-6)
    for got in texts[1:]:
        np.testing.assert_allclose(got, texts[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["amp", "bf16"])
def test_torch_precisions_match_the_plain_path(precision, tiny_checkpoint, tiny_archives):
    from fklip.data.archive import ImageArchive
    from fklip.model import build_tokenizer

    ckpt, model = _plain_model(tiny_checkpoint, "cpu", precision)
    texts = _texts(20)
    with build_runner(EncodeConfig("torch", checkpoint=tiny_checkpoint, precision=precision, threads=1)) as runner, \
            ImageArchive(tiny_archives["uint8_hwc"]) as archive:
        ids = archive.ids[:20]
        images = pipeline.encode_archive(runner, archive, 7, image_ids=ids)
        ref = plain_images(model, archive, 7, precision=precision, image_ids=ids)
        got = pipeline.encode_texts(runner, tokenizer_for(runner), texts, 7)
    tol = {"min_cosine": 0.9999, "max_abs": 1e-2}  # bf16 rounding may differ with the batch's length
    assert_within(images, ref, tol)
    assert_within(got, plain_texts(model, build_tokenizer(ckpt.spec), texts, 7, precision=precision), tol)


@pytest.mark.parametrize("ids_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("graph", ["float", "uint8"])
def test_onnx_casts_ids_of_either_dtype(graph, ids_dtype, tiny_exports, reference):
    with build_runner(EncodeConfig("onnx", engine_dir=tiny_exports[graph])) as runner:
        ids = tokenizer_for(runner)(_texts(N_IMAGES)).numpy().astype(ids_dtype)  # (N, 77)
        got = runner.encode_texts(ids)
    assert runner.ids_dtype == {"float": "int32", "uint8": "int64"}[graph]
    assert_within(got, reference["texts"], _tolerance(tiny_exports[graph], "text"))


def test_onnx_int8_graphs(tiny_exports, tiny_archives, reference):
    from fklip.data.archive import ImageArchive

    export = tiny_exports["float"]
    with build_runner(EncodeConfig("onnx", engine_dir=export, int8=True)) as runner, \
            ImageArchive(tiny_archives["uint8_hwc"]) as archive:
        assert runner.precision == "int8"
        images = pipeline.encode_archive(runner, archive, 7)
        texts = pipeline.encode_texts(runner, tokenizer_for(runner), _texts(N_IMAGES), 7)
    assert_within(images, reference["uint8_hwc"], _tolerance(export, "image", "int8"))
    assert_within(texts, reference["texts"], _tolerance(export, "text", "int8"))


def test_onnx_splits_batches_above_max_batch(tiny_exports, tiny_archives):
    from fklip.data.archive import ImageArchive

    with build_runner(EncodeConfig("onnx", engine_dir=tiny_exports["float"])) as runner, \
            ImageArchive(tiny_archives["float32_chw"]) as archive:
        session, seen = runner._sessions["image"], []

        class Spy:
            def run(self, names, feeds):
                seen.append(len(next(iter(feeds.values()))))
                return session.run(names, feeds)

        runner._sessions["image"] = Spy()
        got = runner.encode_images(archive.read_batch(archive.ids[:40]))
    assert runner.max_batch == 16 and seen == [16, 16, 8] and got.shape == (40, 64)


# ---- the pipeline's own semantics, exactly, with a runner whose rows depend on their input only


class RowRunner:
    """Features picked from each row's input: any mix-up of rows or batches changes the result."""

    backend, device, image_encoding = "rows", "cpu", "float32_chw"
    model_name, truncation, embed_dim, context_length = "rows", "original", 4, 77

    def __init__(self, image_size: int, fail_at: int | None = None):
        self.image_size, self.fail_at, self.calls, self.inputs = image_size, fail_at, 0, []

    def encode_images(self, pixels) -> np.ndarray:
        from fklip.runner import as_numpy, images_in_encoding

        self.calls += 1
        self.inputs.append((type(pixels).__name__, str(pixels.dtype)))
        if self.calls == self.fail_at:
            raise RuntimeError("runner failed")
        x = images_in_encoding(as_numpy(pixels), self.image_size, "float32_chw")  # (B, 3, S, S)
        return np.stack([x[:, 0, 0, 0], x[:, 1, 5, 7], x[:, 2, -1, -1], x[:, 0, 3, 2]], 1)

    def encode_texts(self, ids) -> np.ndarray:
        from fklip.runner import as_numpy

        ids = as_numpy(ids)
        return np.stack([ids[:, 1], ids[:, 2], ids.argmax(1), (ids > 0).sum(1)], 1).astype(np.float32)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_pipeline_order_and_out(batch_size, tiny_spec, tiny_archives, tmp_path):
    from fklip.data.archive import ImageArchive
    from fklip.model import Tokenizer

    runner = RowRunner(tiny_spec.image_size)
    with ImageArchive(tiny_archives["uint8_hwc"]) as archive:
        ids = list(np.random.default_rng(1).permutation(archive.ids)) + [archive.ids[3]]
        expected = runner.encode_images(archive.read_batch(ids))
        out = np.lib.format.open_memmap(tmp_path / "images.npy", "w+", np.float32, (len(ids), 4))
        got = pipeline.encode_archive(runner, archive, batch_size, image_ids=ids, out=out)
    assert got is out and np.array_equal(np.load(tmp_path / "images.npy"), expected)
    texts, tokenizer = _texts(30), Tokenizer("original", 77)
    got = pipeline.encode_texts(runner, tokenizer, texts, batch_size)
    assert np.array_equal(got, runner.encode_texts(tokenizer(texts).numpy()))
    assert np.array_equal(pipeline.encode_ids(runner, tokenizer(texts).numpy(), batch_size), got)
    assert pipeline.encode_texts(runner, tokenizer, [], batch_size).shape == (0, 4)


def test_cuda_runners_get_pinned_uint8_tensors(tiny_spec, tiny_archives, monkeypatch):
    """On CUDA, batches are read into pinned torch tensors and uint8 stays uint8 (pinning is
    faked here, so that the path runs without a GPU)."""
    import torch

    from fklip.data.archive import ImageArchive

    empty, pinned = torch.empty, []

    def fake_empty(*shape, pin_memory=False, **kw):
        pinned.append(pin_memory)
        return empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", fake_empty)
    cpu, cuda = RowRunner(tiny_spec.image_size), RowRunner(tiny_spec.image_size)
    cuda.device = "cuda:0"
    with ImageArchive(tiny_archives["uint8_hwc"]) as archive:
        expected = pipeline.encode_archive(cpu, archive, 16)
        got = pipeline.encode_archive(cuda, archive, 16)
    assert np.array_equal(got, expected)
    assert pinned == [True] * 5 and set(cuda.inputs) == {("Tensor", "torch.uint8")}
    assert set(cpu.inputs) == {("ndarray", "uint8")}


def _reader_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "fklip-batches"]


def test_an_error_in_the_reading_thread_surfaces(tiny_spec, tiny_archives):
    from fklip.data.archive import ImageArchive

    class Unreadable(Exception):
        pass

    with ImageArchive(tiny_archives["float32_chw"]) as archive:
        read, calls = archive.read_batch, []

        def failing_read(chunk, out=None):
            calls.append(len(chunk))
            if len(calls) == 3:
                raise Unreadable("disk error")
            return read(chunk, out)

        archive.read_batch = failing_read
        with pytest.raises(Unreadable, match="disk error"):
            pipeline.encode_archive(RowRunner(tiny_spec.image_size), archive, 7)
    assert not _reader_threads()


def test_an_error_in_the_runner_stops_the_reader(tiny_spec, tiny_archives):
    from fklip.data.archive import ImageArchive

    with ImageArchive(tiny_archives["float32_chw"]) as archive, pytest.raises(RuntimeError, match="runner failed"):
        pipeline.encode_archive(RowRunner(tiny_spec.image_size, fail_at=2), archive, 1)
    assert not _reader_threads()
    with pipeline.in_background(iter(range(100))) as items:  # leaving early joins the thread too
        assert next(items) == 0
    assert not _reader_threads()


def test_pipeline_checks(tiny_spec, tiny_archives):
    from fklip.data.archive import ImageArchive
    from fklip.model import Tokenizer

    runner = RowRunner(tiny_spec.image_size)
    with ImageArchive(tiny_archives["float32_chw"]) as archive:
        with pytest.raises(DataError, match="not in the archive"):
            pipeline.encode_archive(runner, archive, 8, image_ids=["nope"])
        with pytest.raises(ConfigError, match="batch size"):
            pipeline.encode_archive(runner, archive, 0)
        with pytest.raises(ValueError, match="output array"):
            pipeline.encode_archive(runner, archive, 8, out=np.empty((3, 4), np.float32))
        runner.image_size = 32
        with pytest.raises(DataError, match="expects 32x32"):
            pipeline.encode_archive(runner, archive, 8)
    with pytest.raises(ConfigError, match="truncates"):
        pipeline.encode_texts(runner, Tokenizer("openai", 77), ["a dress"], 8)


# ---- conversions, ids, configuration errors


def test_batch_conversions_equal_the_per_image_conversions():
    from fklip.data.archive import normalized_from_pixels, pixels_from_normalized

    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    floats = normalized_from_pixels(pixels)
    assert np.array_equal(floats, np.stack([normalized_from_pixels(p) for p in pixels]))
    assert np.array_equal(pixels_from_normalized(floats), pixels)
    noisy = floats + np.float32(0.01)
    assert np.array_equal(pixels_from_normalized(noisy), np.stack([pixels_from_normalized(f) for f in noisy]))


def test_runners_refuse_bad_inputs(tiny_checkpoint, tiny_exports):
    for cfg in (EncodeConfig("torch", checkpoint=tiny_checkpoint), EncodeConfig("onnx", engine_dir=tiny_exports["float"])):
        with build_runner(cfg) as runner:
            with pytest.raises(DataError, match="context length 77"):
                runner.encode_texts(np.ones((2, 78), np.int64))
            with pytest.raises(DataError, match="values span"):
                runner.encode_texts(np.array([[49406, -1, 49407]]))
            with pytest.raises(DataError, match="expected float32"):
                runner.encode_images(np.zeros((2, 3, 32, 32), np.float32))
            assert runner.encode_images(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, 64)
    with build_runner(EncodeConfig("onnx", engine_dir=tiny_exports["float"])) as runner, \
            pytest.raises(DataError, match="int32"):  # the graph takes int32 ids
        runner.encode_texts(np.array([[49406, 2**33, 49407]], np.int64))


def test_config_errors(tiny_checkpoint, tiny_exports):
    export = tiny_exports["float"]
    with pytest.raises(ConfigError, match="is an export folder"):
        build_runner(EncodeConfig("torch", engine_dir=export))
    with pytest.raises(ConfigError, match="--engine onnx needs --engine-dir"):
        build_runner(EncodeConfig("onnx", checkpoint=tiny_checkpoint))
    with pytest.raises(ConfigError, match="--cuda-graphs needs --device cuda"):
        build_runner(EncodeConfig("torch", checkpoint=tiny_checkpoint, cuda_graphs=True))
    with pytest.raises(ConfigError, match="--device"):
        build_runner(EncodeConfig("onnx", engine_dir=export, device="gpu0"))
    with pytest.raises(ConfigError, match="--compile applies to --engine torch"):
        build_runner(EncodeConfig("onnx", engine_dir=export, compile=True))
    with pytest.raises(ConfigError, match="--engine"):
        build_runner(EncodeConfig("tflite"))
    with pytest.raises(ConfigError, match="no int8 graphs"):
        build_runner(EncodeConfig("onnx", engine_dir=tiny_exports["uint8"], int8=True)).__enter__()
    with pytest.raises(ConfigError, match="--precision fp16"):
        build_runner(EncodeConfig("onnx", engine_dir=export, precision="fp16")).__enter__()


def test_runners_describe_their_model(tiny_checkpoint, tiny_exports, tiny_spec):
    for cfg in (EncodeConfig("torch", checkpoint=tiny_checkpoint), EncodeConfig("onnx", engine_dir=tiny_exports["uint8"])):
        with build_runner(cfg) as runner:
            assert (runner.model_name, runner.truncation, runner.embed_dim, runner.image_size, runner.context_length) \
                == (tiny_spec.name, "original", 64, 64, 77)
            tok = tokenizer_for(runner)
            assert (tok.truncation, tok.context_length) == ("original", 77)
    assert runner.image_encoding == "uint8_hwc"


# ---- execution providers


def test_onnx_cuda_without_onnxruntime_gpu_is_a_clear_error(tiny_exports, monkeypatch):
    import onnxruntime

    # as onnxruntime (CPU) is here; with onnxruntime-gpu installed the answer must be the same
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(MissingDependencyError, match="onnxruntime-gpu"):
        build_runner(EncodeConfig("onnx", engine_dir=tiny_exports["float"], device="cuda:0")).__enter__()


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_onnx_cuda_never_falls_back_to_the_cpu(tiny_exports, monkeypatch):
    import onnxruntime

    class CpuOnly(onnxruntime.InferenceSession):  # what onnxruntime-gpu does when CUDA fails to load
        def __init__(self, path, options=None, providers=None, **kw):
            super().__init__(path, options, providers=["CPUExecutionProvider"], **kw)

    # claim CUDA is there: onnxruntime then builds a CPU session, which must be refused
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", CpuOnly)
    with pytest.raises(FklipError, match="instead of CUDAExecutionProvider"):
        build_runner(EncodeConfig("onnx", engine_dir=tiny_exports["float"], device="cuda")).__enter__()


def test_onnx_session_raises_instead_of_rerunning_on_the_cpu(tiny_exports):
    """A provider failure during run() (EPFail: a CUDA error, say) raises; onnxruntime's default
    would print a line, rebuild the session on the CPU and stay there for every later batch."""
    import numpy as np
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    from export.onnx_export import ort_session

    session = ort_session(tiny_exports["float"] / "text.onnx")

    class Failing:  # the C++ session, failing the way a broken execution provider does
        def __init__(self, inner):
            self.inner = inner

        def run(self, *args):
            raise C.EPFail("CUDA failure 700: an illegal memory access was encountered")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    session._sess = Failing(session._sess)
    with pytest.raises(C.EPFail, match="illegal memory access"):
        session.run(None, {"text_ids": np.ones((1, 4), np.int32)})


# ---- manifest errors


@pytest.fixture
def export_copy(tiny_exports, tmp_path):
    return shutil.copytree(tiny_exports["float"], tmp_path / "export")


def test_tampered_graph(export_copy):
    from export.manifest import ExportManifest

    with open(export_copy / "image.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=r"image\.onnx was modified after export"):
        ExportManifest.read(export_copy)
    with pytest.raises(DataError, match="modified after export"):
        build_runner(EncodeConfig("onnx", engine_dir=export_copy)).__enter__()
    ExportManifest.read(export_copy, int8=True)  # the int8 pair is untouched


def test_manifest_errors(export_copy, tmp_path):
    from export.manifest import ExportManifest

    manifest_path = export_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    with pytest.raises(ConfigError, match="no such export folder"):
        ExportManifest.read(tmp_path / "absent")
    (export_copy / "text.int8.onnx").unlink()
    with pytest.raises(DataError, match=r"text\.int8\.onnx \(text tower\) is listed in manifest.json but missing"):
        ExportManifest.read(export_copy, int8=True)
    for change, message in (({"format": "something-else"}, "not an fklip export manifest"),
                            ({"version": 99}, "version 99 is not supported"),
                            ({"model": {"name": "x"}}, r"model\.embed_dim")):
        manifest_path.write_text(json.dumps({**manifest, **change}))
        with pytest.raises(DataError, match=message):
            ExportManifest.read(export_copy)
    manifest_path.write_text(json.dumps({**manifest, "model": {**manifest["model"], "activation": "relu"}}))
    with pytest.raises(DataError, match=r'"model\.activation" should be one of gelu, quick_gelu'):
        ExportManifest.read(export_copy)
    manifest_path.unlink()
    with pytest.raises(DataError, match=r"manifest\.json: missing, so .* is not an fklip export folder \(it holds .*image\.onnx"):
        ExportManifest.read(export_copy)


def test_exports_without_the_activation_still_run(export_copy, tiny_exports):
    """Manifests written before fklip recorded "model.activation" open, and give the same features."""
    manifest_path = export_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["model"].pop("activation") == "quick_gelu"
    manifest_path.write_text(json.dumps(manifest))
    features = []
    for folder in (export_copy, tiny_exports["float"]):
        with build_runner(EncodeConfig("onnx", engine_dir=folder)) as runner:
            features.append(pipeline.encode_texts(runner, tokenizer_for(runner), _texts(9), 4))
    np.testing.assert_array_equal(features[0], features[1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_towers_match_the_plain_path(precision, tiny_checkpoint, tiny_archives, reference):
    """--fused: export.towers with SDPA attention against open_clip's modules in fp32."""
    from fklip.data.archive import ImageArchive

    tol = ({"min_cosine": 0.99999, "max_abs": 1e-5} if precision == "fp32"
           else {"min_cosine": 0.999, "max_abs": 2e-2})
    cfg = EncodeConfig("torch", checkpoint=tiny_checkpoint, fused=True, precision=precision)
    with build_runner(cfg) as runner:
        assert runner.model is None and set(runner._towers) == {"image", "text"}
        for encoding in ("uint8_hwc", "float32_chw"):
            with ImageArchive(tiny_archives[encoding]) as archive:
                for batch_size in (7, 64):
                    assert_within(pipeline.encode_archive(runner, archive, batch_size), reference[encoding], tol)
        for batch_size in (7, 64):  # captions cut at each batch's last end token, and one at 77
            got = pipeline.encode_texts(runner, tokenizer_for(runner), _texts(N_IMAGES), batch_size)
            assert_within(got, reference["texts"], tol)


def test_fused_towers_take_one_weight_dtype(tiny_checkpoint):
    with pytest.raises(ConfigError, match=r"--precision: expected one of fp32, fp16, bf16 \(--fused runs weights in one dtype\)"):
        build_runner(EncodeConfig("torch", checkpoint=tiny_checkpoint, fused=True, precision="amp"))


# ---- torch.compile (CPU: about a minute of compiling on two cores), GPU: CUDA graphs, pinned memory


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny_checkpoint, tiny_archives, reference):
    from fklip.data.archive import ImageArchive

    texts = _texts(N_IMAGES)[:7]
    with build_runner(EncodeConfig("torch", checkpoint=tiny_checkpoint, compile=True)) as runner, \
            ImageArchive(tiny_archives["uint8_hwc"]) as archive:
        images = runner.encode_images(archive.read_batch(archive.ids[:7]))
        got = pipeline.encode_texts(runner, tokenizer_for(runner), texts, 7)
    tol = {"min_cosine": 0.99999, "max_abs": 1e-5}
    assert_within(images, reference["uint8_hwc"][:7], tol)
    assert_within(got, reference["texts"][:7], tol)


@needs_cuda
@pytest.mark.parametrize("options", [{"cuda_graphs": True}, {"compile": True}, {"precision": "amp", "cuda_graphs": True},
                                     {"fused": True, "precision": "fp16", "cuda_graphs": True},
                                     {"fused": True, "precision": "bf16", "compile": True}])
def test_torch_cuda_matches_the_plain_path_on_cuda(options, tiny_checkpoint, tiny_archives):
    from fklip.data.archive import ImageArchive
    from fklip.model import build_tokenizer

    precision = options.get("precision", "fp32")
    ref_precision = "fp32" if options.get("fused") else precision  # fused: against open_clip in fp32
    ckpt, model = _plain_model(tiny_checkpoint, "cuda", ref_precision)
    tol = {"min_cosine": 0.99999, "max_abs": 1e-4} if precision == "fp32" else {"min_cosine": 0.999, "max_abs": 2e-2}
    texts = _texts(N_IMAGES)
    with build_runner(EncodeConfig("torch", checkpoint=tiny_checkpoint, device="cuda", **options)) as runner:
        for encoding in ("uint8_hwc", "float32_chw"):
            with ImageArchive(tiny_archives[encoding]) as archive:
                ref = plain_images(model, archive, 256, "cuda", precision=ref_precision)
                for batch_size in BATCH_SIZES:
                    assert_within(pipeline.encode_archive(runner, archive, batch_size), ref, tol)
        ref = plain_texts(model, build_tokenizer(ckpt.spec), texts, 256, "cuda", precision=ref_precision)
        for batch_size in (7, 64):
            assert_within(pipeline.encode_texts(runner, tokenizer_for(runner), texts, batch_size), ref, tol)
        if options.get("cuda_graphs"):
            assert runner._graphs  # captured, and replayed for the repeated shapes


@needs_cuda
def test_cuda_graph_capture_while_another_thread_pins_and_copies(tiny_checkpoint, tiny_archives):
    """The pipeline's reader thread pins host memory and copies to the GPU while the runner
    captures a graph for a new batch shape; in the default "global" capture mode those calls
    fail and invalidate the capture. Every capture here overlaps such a thread."""
    import threading

    import torch

    from fklip.data.archive import ImageArchive

    stop = threading.Event()

    def pin_and_copy():
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            while not stop.is_set():
                torch.empty(1 << 24, dtype=torch.uint8, pin_memory=True).to("cuda", non_blocking=True)
                side.synchronize()

    with ImageArchive(tiny_archives["uint8_hwc"]) as archive:
        batch = archive.read_batch(archive.ids[:N_IMAGES])
    with build_runner(EncodeConfig("torch", checkpoint=tiny_checkpoint, device="cuda")) as runner:
        ref = runner.encode_images(batch)
    worker = threading.Thread(target=pin_and_copy, daemon=True)
    worker.start()
    try:
        with build_runner(EncodeConfig("torch", checkpoint=tiny_checkpoint, device="cuda", cuda_graphs=True)) as runner:
            for size in (1, 2, 3, 5, 8, N_IMAGES):  # a capture per new shape
                assert_within(runner.encode_images(batch[:size]), ref[:size], {"min_cosine": 0.99999, "max_abs": 1e-4})
            assert len(runner._graphs) >= 6
    finally:
        stop.set()
        worker.join()


@needs_cuda
def test_onnx_on_cuda(tiny_exports, tiny_archives, reference):
    import onnxruntime

    from fklip.data.archive import ImageArchive

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")
    export = tiny_exports["uint8"]
    with build_runner(EncodeConfig("onnx", engine_dir=export, device="cuda")) as runner, \
            ImageArchive(tiny_archives["uint8_hwc"]) as archive:
        got = pipeline.encode_archive(runner, archive, 64)
    assert_within(got, reference["uint8_hwc"], _tolerance(export, "image"))


# ---- ViT-B-32 (random weights): the real model's size through every backend


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    import torch

    from fklip.model import ModelSpec, build_model, save_checkpoint

    root = tmp_path_factory.mktemp("vit-b-32")
    spec = ModelSpec.from_name("ViT-B-32")
    torch.manual_seed(0)
    save_checkpoint(root / "vit-b-32.pt", build_model(spec), spec)
    _export(root / "vit-b-32.pt", root / "export", opt_batch=8, max_batch=32)
    archives = _write_archives(root, 9, spec.image_size)
    return {"checkpoint": root / "vit-b-32.pt", "export": root / "export", "archives": archives, "spec": spec}


@pytest.fixture(scope="module")
def vit_b32_reference(vit_b32):
    from fklip.data.archive import ImageArchive
    from fklip.model import build_tokenizer

    ckpt, model = _plain_model(vit_b32["checkpoint"])
    with ImageArchive(vit_b32["archives"]["uint8_hwc"]) as archive:
        images = plain_images(model, archive, 64)
    texts = plain_texts(model, build_tokenizer(ckpt.spec), _texts(9), 64)
    return {"images": images, "texts": texts}


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_vit_b32_matches_torch(backend, vit_b32, vit_b32_reference):
    from fklip.data.archive import ImageArchive

    export = vit_b32["export"]
    with build_runner(_case(backend, vit_b32["checkpoint"], export)) as runner:
        for encoding, batch_sizes in (("uint8_hwc", BATCH_SIZES), ("float32_chw", (64,))):
            with ImageArchive(vit_b32["archives"][encoding]) as archive:
                for batch_size in batch_sizes:
                    got = pipeline.encode_archive(runner, archive, batch_size)
                    assert_within(got, vit_b32_reference["images"], _tolerance(export, "image"))
        for batch_size in (1, 64):
            got = pipeline.encode_texts(runner, tokenizer_for(runner), _texts(9), batch_size)
            assert_within(got, vit_b32_reference["texts"], _tolerance(export, "text"))


@pytest.mark.parametrize("chunk_batches", [1, 2, 64])
def test_texts_are_batched_by_length_and_returned_in_order(chunk_batches, monkeypatch):
    """Captions of similar length share a batch (sorted within each chunk of batches), so a batch
    cut after its last end token carries little padding; results come back in input order."""
    from fklip.model import Tokenizer

    monkeypatch.setattr(pipeline, "SORT_CHUNK_BATCHES", chunk_batches)
    rng = np.random.default_rng(0)
    words = ["red", "short", "sleeve", "t-shirt", "wool", "coat", "with", "buttons", "and", "pockets"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 25)))) for _ in range(37)]
    tokenizer = Tokenizer("original", 77)
    seen = []

    class Spy(RowRunner):
        def encode_texts(self, ids):
            seen.append(np.asarray(ids).argmax(1))  # the end token's position per row
            return super().encode_texts(ids)

    runner = Spy(64)
    got = pipeline.encode_texts(runner, tokenizer, texts, 4)
    assert np.array_equal(got, runner.encode_texts(tokenizer(texts).numpy()))
    chunk = 4 * chunk_batches
    positions = np.concatenate(seen[:-1])
    for start in range(0, len(texts), chunk):  # non-decreasing within each chunk
        part = positions[start:start + chunk]
        assert np.all(np.diff(part) >= 0)
    if chunk_batches == 64:  # one chunk: every batch spans a narrow band of lengths
        spans = [int(p.max() - p.min()) for p in seen[:-1]]
        assert max(spans) < int(positions.max() - positions.min())
