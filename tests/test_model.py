import collections
import dataclasses
import logging
import os
import pickle

import pytest
import torch

from fklip.errors import CheckpointError, ConfigError
from fklip.model import (
    MODEL_ALIASES,
    ModelSpec,
    Tokenizer,
    build_model,
    build_tokenizer,
    config_from_state_dict,
    load_checkpoint,
    save_checkpoint,
)

LONG = "oversized wool coat in charcoal grey " * 20  # far more than 75 BPE tokens


@dataclasses.dataclass
class NotATensor:  # a class torch's weights-only unpickler refuses
    x: int = 1


def _features(model, tokens=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(3, 3, size, size, generator=g)
    if tokens is None:
        tokens = Tokenizer()(["a photo of a red dress", "navy coat", LONG])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_tiny_model_is_registered_and_small(tiny_spec, tiny_model):
    assert tiny_spec.name == "fklip-tiny" and tiny_spec.image_size == 64 and tiny_spec.embed_dim == 64
    n = sum(p.numel() for p in tiny_model.parameters())
    assert n < 10_000_000
    image_emb, text_emb = _features(tiny_model)
    assert image_emb.shape == (3, 64) and text_emb.shape == (3, 64)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-B-16", "ViT-L-14"])
def test_open_clip_names_resolve(name):
    spec = ModelSpec.from_name(name)
    assert spec.config["embed_dim"] in (512, 768)


def test_aliases_and_unknown_names():
    assert ModelSpec.from_name("ViT-B/32").name == MODEL_ALIASES["ViT-B/32"] == "ViT-B-32-quickgelu"
    assert ModelSpec.from_name("ViT-B/32").config["quick_gelu"] is True
    with pytest.raises(ConfigError, match=r"--model: unknown model 'ViT-B-33'; did you mean ViT-B-32"):
        ModelSpec.from_name("ViT-B-33")
    with pytest.raises(ConfigError, match="--truncation"):
        ModelSpec("fklip-tiny", {}, "middle")


def test_tokenizer_truncation_modes():
    original, openai = Tokenizer("original"), Tokenizer("openai")
    short = original(["a photo of short sleeve t-shirt"])[0]
    assert short[0] == 49406 and 49407 in short.tolist() and short[-1] == 0
    assert torch.equal(short, openai(["a photo of short sleeve t-shirt"])[0])
    a, b = original([LONG])[0], openai([LONG])[0]
    assert a.shape == b.shape == (77,)
    assert 49407 not in a.tolist()  # the original keeps the first 77 tokens, no end-of-text
    assert b[-1] == 49407 and torch.equal(a[:-1], b[:-1])
    # matches open_clip's own tokenizer, which is OpenAI-style
    import open_clip

    assert torch.equal(b, open_clip.tokenize([LONG])[0])
    assert original.decode(original(["a red dress"])[0].tolist()).strip() == "a red dress"
    # cleaning as the original: ftfy, html unescape, whitespace, lower case
    assert torch.equal(original(["A  Photo &amp; X"]), original(["a photo & x"]))


def test_tokenizer_equals_open_clips_encode():
    """fklip memoises BPE per word and skips ftfy/html for printable ASCII without "&": the ids
    must be open_clip's SimpleTokenizer.encode for any text, ASCII or not."""
    import random

    from open_clip.tokenizer import SimpleTokenizer

    ref, tok = SimpleTokenizer(), Tokenizer("original")
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\r", "\x1b", "\x00", "é", "ﬁ", "’", "Ｔ",
                                                    "&amp;", "&#39;", "Ã©", "\u2028", "😀", " ", " ", "  "]
    texts = ["", " ", "Short sleeve T-shirt in black. Crewneck collar.", "it's a 'quoted' \"dress\"", LONG,
             "RED  dress\twith\nlong   sleeves", "don't", "x&y", "&lt;b&gt;bold&lt;/b&gt;", "Ã©tÃ© dress"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(400)]
    for text in texts + texts:  # twice: the second pass hits the per-word memo
        assert list(tok._bpe_ids(text)) == ref.encode(text), repr(text)


def test_original_truncation_pools_at_largest_id(tiny_model):
    """Without an EOT token the text feature comes from the position of the largest token id."""
    tokens = Tokenizer("original")([LONG])
    with torch.no_grad():
        x = tiny_model.encode_text(tokens)
    assert torch.isfinite(x).all()
    assert int(tokens[0].argmax()) != 76 or int(tokens[0, 76]) == int(tokens[0].max())


def test_fklip_checkpoint_round_trip(tmp_path, tiny_spec, tiny_model):
    spec = ModelSpec(tiny_spec.name, tiny_spec.config, "openai")
    path = tmp_path / "ckpt" / "epoch_3.pt"
    save_checkpoint(path, tiny_model, spec, epoch=3, extra={"optimizer": {"lr": 1e-5}})
    assert [p.name for p in path.parent.iterdir()] == ["epoch_3.pt"]  # no temporary left behind
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and all(k.startswith("module.") for k in raw["state_dict"])
    ckpt = load_checkpoint(path)
    assert ckpt.source_format == "fklip" and ckpt.epoch == 3
    assert ckpt.spec.name == "fklip-tiny" and ckpt.spec.truncation == "openai"
    assert ckpt.extra["optimizer"] == {"lr": 1e-5}
    for a, b in zip(_features(tiny_model), _features(ckpt.model)):
        assert torch.equal(a, b)


def test_original_pai_checkpoint(tmp_path, tiny_model):
    sd = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}
    torch.save({"epoch": 7, "name": "pai-clip", "state_dict": sd}, tmp_path / "pai.pt")
    ckpt = load_checkpoint(tmp_path / "pai.pt")
    assert ckpt.source_format == "original" and ckpt.epoch == 7
    assert ckpt.spec.truncation == "original"  # checkpoints from the original code
    assert ckpt.spec.config["vision_cfg"]["patch_size"] == 16
    for a, b in zip(_features(tiny_model), _features(ckpt.model)):
        assert torch.equal(a, b)
    # the same file with an explicit architecture
    assert load_checkpoint(tmp_path / "pai.pt", model_name="fklip-tiny").spec.name == "fklip-tiny"


def test_plain_open_clip_and_openai_state_dicts(tmp_path, tiny_model):
    torch.save(tiny_model.state_dict(), tmp_path / "open_clip.pt")
    openai_sd = dict(tiny_model.state_dict())
    openai_sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))
    openai_sd = {k: (v.half() if v.is_floating_point() else v) for k, v in openai_sd.items()}
    torch.save(openai_sd, tmp_path / "openai.pt")
    a = load_checkpoint(tmp_path / "open_clip.pt")
    b = load_checkpoint(tmp_path / "openai.pt")
    assert a.source_format == "state-dict" and b.source_format == "openai-state-dict"
    assert next(b.model.parameters()).dtype == torch.float32  # fp16 weights loaded into fp32
    ia, ta = _features(tiny_model)
    ib, tb = _features(b.model)
    torch.testing.assert_close(ib, ia, atol=2e-2, rtol=0)
    torch.testing.assert_close(tb, ta, atol=2e-2, rtol=0)


def test_openai_torchscript_archive(tmp_path, tiny_model):
    tokens = Tokenizer()(["a red dress"])
    traced = torch.jit.trace(tiny_model, (torch.randn(1, 3, 64, 64), tokens), strict=False,
                             check_trace=False)
    traced.save(str(tmp_path / "ViT-tiny.pt"))
    ckpt = load_checkpoint(tmp_path / "ViT-tiny.pt")
    assert ckpt.source_format == "openai-torchscript"
    for a, b in zip(_features(tiny_model), _features(ckpt.model)):
        assert torch.equal(a, b)


def test_vit_b_32_shapes_are_inferred(tmp_path):
    spec = ModelSpec.from_name("ViT-B-32-quickgelu")
    model = build_model(spec)
    inferred = config_from_state_dict(model.state_dict())
    assert inferred["vision_cfg"] == {"image_size": 224, "layers": 12, "width": 768, "head_width": 64,
                                      "patch_size": 32}
    assert inferred["text_cfg"]["heads"] == 8 and inferred["text_cfg"]["layers"] == 12
    assert inferred["embed_dim"] == 512


def test_wrong_architecture_lists_keys_and_shapes(tmp_path, tiny_model):
    torch.save({"epoch": 1, "state_dict": tiny_model.state_dict()}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "t.pt", model_name="ViT-B-32")
    msg = str(e.value)
    assert "weights do not fit model ViT-B-32" in msg
    assert "missing: visual.transformer.resblocks.2." in msg
    assert "shape mismatch: positional_embedding (77, 128) vs model (77, 512)" in msg
    sd = dict(tiny_model.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["ln_final.bias"]
    torch.save(sd, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match=r"1 missing: ln_final\.bias; 1 unexpected: extra\.weight"):
        load_checkpoint(tmp_path / "u.pt", model_name="fklip-tiny")


def test_pickled_code_is_refused_unless_trusted(tmp_path, tiny_model):
    sd = collections.OrderedDict(tiny_model.state_dict())
    torch.save({"epoch": 1, "state_dict": sd, "args": NotATensor()}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match="--trust-checkpoint") as e:
        load_checkpoint(tmp_path / "p.pt")
    assert "NotATensor" in str(e.value)
    assert load_checkpoint(tmp_path / "p.pt", trust=True).source_format == "original"


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_newer_fklip_format_is_refused(tmp_path, tiny_model, tiny_spec):
    save_checkpoint(tmp_path / "c.pt", tiny_model, tiny_spec)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["fklip"]["version"] = 99
    torch.save(raw, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="upgrade fklip"):
        load_checkpoint(tmp_path / "c.pt")


def test_build_tokenizer_follows_spec(tiny_spec):
    tok = build_tokenizer(ModelSpec(tiny_spec.name, tiny_spec.config, "openai"))
    assert tok.truncation == "openai" and tok.context_length == 77


def test_original_model_names_mean_quickgelu_for_foreign_checkpoints(tmp_path):
    """The original README passes `--model ViT-B-32` with the PAI checkpoint: that is QuickGELU."""
    model = build_model(ModelSpec.from_name("ViT-B-32-quickgelu"))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "pai.pt")
    ckpt = load_checkpoint(tmp_path / "pai.pt", model_name="ViT-B-32")
    assert ckpt.spec.name == "ViT-B-32-quickgelu" and ckpt.spec.config["quick_gelu"] is True
    tokens = Tokenizer()(["a red dress"])
    with torch.no_grad():
        assert torch.equal(ckpt.model.encode_text(tokens), model.encode_text(tokens))


@pytest.mark.parametrize("truncation", ["original", "openai"])
def test_trimmed_text_encoding_equals_the_full_77_positions(tiny_model, truncation):
    """Causal text tower pooled at the largest id: later positions cannot change the result."""
    from fklip.model import encode_text_trimmed

    tok = Tokenizer(truncation)
    texts = ["a photo of ", "a photo of striped short sleeve t-shirt", LONG, "Red dotted dress in silk."]
    tokens = tok(texts)
    full = tiny_model.encode_text(tokens)
    trimmed = encode_text_trimmed(tiny_model, tokens)
    torch.testing.assert_close(trimmed, full, atol=2e-5, rtol=0)
    # host ids cut on the host and copied to the device: the same features
    torch.testing.assert_close(encode_text_trimmed(tiny_model, tokens, "cpu"), trimmed, atol=0, rtol=0)
    # short prompts only: far fewer positions, same features, same gradients
    short = tok(texts[:2])
    assert int(short.argmax(-1).max()) + 1 < 20
    tiny_model.zero_grad()
    tiny_model.encode_text(short).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad()
    encode_text_trimmed(tiny_model, short).square().sum().backward()
    got = {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}
    tiny_model.zero_grad()
    assert expected.keys() == got.keys()
    for name in expected:  # float32 sums in another order: compare relative to the gradient's size
        error = (got[name] - expected[name]).norm() / expected[name].norm().clamp_min(1e-12)
        assert error < 1e-4, (name, float(error))


# ---- the activation: GELU and QuickGELU weights have the same shapes


@pytest.fixture
def gelu_name(tiny_spec, monkeypatch):
    """fklip-tiny's architecture with GELU, registered as open_clip registers ViT-B-32: "tiny-vit"
    is GELU, and "tiny-vit-quickgelu" (derived, as every NAME-quickgelu) its QuickGELU twin."""
    import open_clip

    from fklip.model import list_model_names

    list_model_names()  # fklip's configs first: registering them rescans and would drop this one
    config = {k: v for k, v in tiny_spec.config.items() if k != "quick_gelu"}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-vit", config)
    return "tiny-vit"


@pytest.fixture
def gelu_model(gelu_name):
    torch.manual_seed(1)
    return build_model(ModelSpec.from_name(gelu_name))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("fklip")]


def _assert_same_features(model, reference):
    for got, want in zip(_features(model), _features(reference)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_names_follow_open_clip(gelu_name):
    assert ModelSpec.from_name("ViT-B-32").activation == "gelu"
    assert ModelSpec.from_name("ViT-B-32-quickgelu").activation == "quick_gelu"
    assert ModelSpec.from_name("fklip-tiny").activation == "quick_gelu"
    assert ModelSpec.from_name(gelu_name).activation == "gelu"
    # NAME-quickgelu for a NAME open_clip registers without its twin (ViT-S-32): the same config, QuickGELU
    twin = ModelSpec.from_name("ViT-S-32-quickgelu")
    assert twin.name == "ViT-S-32-quickgelu"
    assert twin.config == {**ModelSpec.from_name("ViT-S-32").config, "quick_gelu": True}
    with pytest.raises(ConfigError, match="unknown model 'ViT-Q-32-quickgelu'"):
        ModelSpec.from_name("ViT-Q-32-quickgelu")


def test_plain_state_dict_is_built_as_open_clip_names_it(tmp_path, gelu_name, gelu_model, caplog):
    """A GELU model's plain state dict with --model NAME: the GELU model, the very same features."""
    torch.save(gelu_model.state_dict(), tmp_path / "x.pt")
    ckpt = load_checkpoint(tmp_path / "x.pt", model_name=gelu_name)
    assert ckpt.source_format == "state-dict"
    assert ckpt.spec.name == gelu_name and ckpt.spec.activation == "gelu"
    _assert_same_features(ckpt.model, gelu_model)
    assert _warnings(caplog) == [
        f"{tmp_path / 'x.pt'}: a plain state dict does not record its activation; built {gelu_name} (GELU) "
        f"as open_clip names it; pass --model {gelu_name}-quickgelu for QuickGELU weights"]
    # the QuickGELU twin loads the same weights without error but gives other features
    caplog.clear()
    quick = load_checkpoint(tmp_path / "x.pt", model_name=f"{gelu_name}-quickgelu")
    assert quick.spec.activation == "quick_gelu"
    assert (_features(quick.model)[0] - _features(gelu_model)[0]).abs().max() > 1e-3
    assert _warnings(caplog) == [
        f"{tmp_path / 'x.pt'}: a plain state dict does not record its activation; built "
        f"{gelu_name}-quickgelu (QuickGELU) as open_clip names it; pass --model {gelu_name} for GELU weights"]


def test_openai_lineage_is_built_with_quickgelu(tmp_path, gelu_name, tiny_model, caplog):
    """The original's/PAI and OpenAI's state dicts: --model NAME means NAME-quickgelu, as the original."""
    sd = tiny_model.state_dict()  # fklip-tiny is QuickGELU
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "pai.pt")
    torch.save({**sd, "input_resolution": torch.tensor(64), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)}, tmp_path / "openai.pt")
    for file, source in (("pai.pt", "original"), ("openai.pt", "openai-state-dict")):
        caplog.clear()
        ckpt = load_checkpoint(tmp_path / file, model_name=gelu_name)
        assert ckpt.source_format == source
        assert ckpt.spec.name == f"{gelu_name}-quickgelu" and ckpt.spec.activation == "quick_gelu"
        _assert_same_features(ckpt.model, tiny_model)
        (warning,) = _warnings(caplog)
        assert warning.startswith(f"{tmp_path / file}: ")
        assert (f"does not record its activation; built {gelu_name}-quickgelu (QuickGELU) as OpenAI's weights "
                f"and the original's (PAI) are trained; for GELU weights, save the weights alone as a plain "
                f"state dict and pass --model {gelu_name}") in warning
    # without --model: the architecture of the tensor shapes, QuickGELU, and the warning says so
    caplog.clear()
    ckpt = load_checkpoint(tmp_path / "pai.pt")
    assert ckpt.spec.activation == "quick_gelu"
    _assert_same_features(ckpt.model, tiny_model)
    (warning,) = _warnings(caplog)
    assert "does not record its architecture or activation; built the tensor shapes' ViT with QuickGELU" in warning


def test_plain_state_dict_without_model_is_inferred_with_quickgelu(tmp_path, tiny_model, caplog):
    torch.save(tiny_model.state_dict(), tmp_path / "x.pt")
    ckpt = load_checkpoint(tmp_path / "x.pt")
    assert ckpt.spec.activation == "quick_gelu"
    _assert_same_features(ckpt.model, tiny_model)
    assert _warnings(caplog) == [
        f"{tmp_path / 'x.pt'}: a plain state dict does not record its architecture or activation; built the "
        "tensor shapes' ViT with QuickGELU as OpenAI's clip.build_model; pass --model NAME (GELU) or "
        "NAME-quickgelu (QuickGELU), see `fklip data models`"]


def test_torchscript_archives_say_their_activation(tmp_path, gelu_name, gelu_model, tiny_model, caplog):
    """A traced model's modules are named (QuickGELU or GELU): that activation, and no warning."""
    tokens = Tokenizer()(["a red dress"])
    for name, model in (("gelu.pt", gelu_model), ("quick.pt", tiny_model)):
        traced = torch.jit.trace(model, (torch.randn(1, 3, 64, 64), tokens), strict=False, check_trace=False)
        traced.save(str(tmp_path / name))
    gelu = load_checkpoint(tmp_path / "gelu.pt")
    assert gelu.source_format == "openai-torchscript" and gelu.spec.activation == "gelu"
    _assert_same_features(gelu.model, gelu_model)
    named = load_checkpoint(tmp_path / "gelu.pt", model_name=gelu_name)
    assert named.spec.name == gelu_name
    quick = load_checkpoint(tmp_path / "quick.pt", model_name=gelu_name)  # OpenAI's archives: QuickGELU
    assert quick.spec.name == f"{gelu_name}-quickgelu"
    _assert_same_features(quick.model, tiny_model)
    assert _warnings(caplog) == []


def test_fklip_checkpoints_record_the_activation(tmp_path, gelu_name, gelu_model, caplog):
    spec = ModelSpec.from_name(gelu_name)
    save_checkpoint(tmp_path / "c.pt", gelu_model, spec)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert raw["fklip"]["activation"] == "gelu" and raw["fklip"]["version"] == 1
    ckpt = load_checkpoint(tmp_path / "c.pt", model_name=gelu_name)
    assert ckpt.spec.activation == "gelu"
    _assert_same_features(ckpt.model, gelu_model)
    assert _warnings(caplog) == []
    # written before fklip recorded it: the config's quick_gelu says it
    del raw["fklip"]["activation"]
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").spec.activation == "gelu"
    raw["fklip"]["activation"] = "quick_gelu"
    torch.save(raw, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="records activation 'quick_gelu' but its model config builds 'gelu'"):
        load_checkpoint(tmp_path / "edited.pt")


# ---- pickles that run code


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo pwned > {self.marker}",)


class _Evaluates:
    def __init__(self, marker, function):
        self.marker, self.function = marker, function

    def __reduce__(self):
        return self.function, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_calls_name_trust_checkpoint_and_never_run(tmp_path, tiny_model):
    marker = tmp_path / "PWNED"
    sd = tiny_model.state_dict()
    system = f"{os.system.__module__}.system"  # posix.system
    files = {  # name -> (writer, the global the message names)
        "zip.pt": (lambda p: torch.save({"epoch": 1, "state_dict": sd, "args": _RunsShell(marker)}, p), system),
        "legacy.pt": (lambda p: torch.save({"state_dict": sd, "args": _RunsShell(marker)}, p,
                                           _use_new_zipfile_serialization=False), system),
        "raw.pt": (lambda p: p.write_bytes(pickle.dumps(_RunsShell(marker))), system),  # STACK_GLOBAL
        "raw0.pt": (lambda p: p.write_bytes(pickle.dumps(_RunsShell(marker), protocol=0)), system),
        "exec.pt": (lambda p: torch.save({"x": _Evaluates(marker, exec)}, p), "exec"),
        "eval.pt": (lambda p: p.write_bytes(pickle.dumps(_Evaluates(marker, eval))), "builtins.eval"),
    }
    for name, (write, named) in files.items():
        write(tmp_path / name)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        message = str(e.value)
        assert message.startswith(f"{tmp_path / name}: the checkpoint holds Python objects beyond tensors ("), name
        assert named in message and "Pass --trust-checkpoint" in message, (name, message)
        assert not marker.exists(), name
    # the flag is what lets it run: os.system returns 0, and the weights load
    assert load_checkpoint(tmp_path / "zip.pt", trust=True).source_format == "original"
    assert marker.read_text().strip() == "pwned"


def test_files_that_are_not_pickles_are_not_checkpoints(tmp_path):
    import numpy as np

    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.pt").write_bytes(b"")
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays.pt")
    (tmp_path / "huge.pt").write_bytes(b"\x8e" + b"\xff" * 7 + b"\x0f" + b"abc")  # BINBYTES8 of 2**60 bytes
    for name in ("random.pt", "empty.pt", "arrays.pt", "huge.pt"):
        with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
            load_checkpoint(tmp_path / name)

