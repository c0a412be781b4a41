"""The demo dataset generator: layout, formats, consistency, determinism, visible attributes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from fklip.data.archive import (
    ImageArchive,
    normalized_from_pixels,
    pixels_from_normalized,
)
from fklip.data.demo_dataset import (
    DemoDataConfig,
    DemoPaths,
    build_vocabularies,
    demo_paths,
    generate_demo,
    load_demo_manifest,
)
from fklip.data.garments import (
    CATEGORIES,
    COLOURS,
    Garment,
    contrast_colour,
    draw_garment,
)
from fklip.data.jsonl import (
    read_concept_fathers,
    read_concept_queries,
    read_image_gold,
    read_train_queries,
    read_val_queries,
)
from fklip.errors import ConfigError, DataError

SMALL = dict(train=24, val=8, kb=16, size=32)


def _generate(root: Path, **overrides) -> DemoPaths:
    return generate_demo(DemoDataConfig(out=root, **{**SMALL, **overrides}))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoPaths:
    return _generate(tmp_path_factory.mktemp("demo"))


def _digests(paths: DemoPaths) -> dict[str, str]:
    files = {**paths.files(), "manifest": paths.manifest}
    return {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in files.items()}


def _fathers(path: Path) -> dict[str, str]:
    return {f.phrase: f.phrase_father for f in read_concept_fathers(path)}


# ---- layout ----

def test_layout_file_names_and_manifest(demo: DemoPaths):
    root = demo.root
    expected = {
        "fashiongen/train/fashion-gen_train_queries_phrases.jsonl",
        "fashiongen/train/train.32.npz",
        "fashiongen/train/fashion-gen_concepts_queries.jsonl",
        "fashiongen/train/fashion-gen_concepts_fathers.jsonl",
        "fashiongen/val/fashion-gen_val_queries.jsonl",
        "fashiongen/val/val.32.npz",
        "fashiongen/val/fashion-gen_val_images.jsonl",
        "fashion_kb/icbu_concepts_queries.jsonl",
        "fashion_kb/icbu_concepts_fathers.jsonl",
        "fashion_kb/icbu_train_images_5w_00.32.npz",
        "demo.json",
    }
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk == expected  # no temporary files left behind either
    assert demo == demo_paths(root, 32)

    manifest = load_demo_manifest(root)
    assert manifest["format"] == "fklip-demo" and manifest["version"] == 1
    assert manifest["config"] == {"seed": 0, "encoding": "float32_chw", **SMALL}
    assert set(manifest["files"].values()) == expected - {"demo.json"}
    for name, rel in manifest["files"].items():
        assert getattr(demo, name) == root / rel
    counts = manifest["counts"]
    assert counts["train_queries"] == 24 and counts["val_queries"] == 8
    assert counts["kb_images"] == 16
    with ImageArchive(demo.train_images) as a:
        assert counts["train_images"] == len(a)
    with ImageArchive(demo.val_images) as a:
        assert counts["val_images"] == len(a)
    assert counts["data_concepts"] == len(read_concept_queries(demo.concept_queries))
    assert counts["kb_concepts"] == len(read_concept_queries(demo.kb_concept_queries))


def test_manifest_absent_or_foreign(tmp_path: Path):
    assert load_demo_manifest(tmp_path) is None
    assert load_demo_manifest(tmp_path / "nowhere") is None
    (tmp_path / "demo.json").write_text("{not json")
    with pytest.raises(DataError, match="demo.json"):
        load_demo_manifest(tmp_path)
    (tmp_path / "demo.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="fklip-demo"):
        load_demo_manifest(tmp_path)


# ---- formats and consistency ----

def test_archives_hold_exactly_the_query_images(demo: DemoPaths):
    train = read_train_queries(demo.train_queries)
    val = read_val_queries(demo.val_queries)
    with ImageArchive(demo.train_images) as tr, ImageArchive(demo.val_images) as va, \
            ImageArchive(demo.kb_images) as kb:
        for a in (tr, va, kb):
            assert a.encoding == "float32_chw" and (a.height, a.width) == (32, 32)
            assert a.image_shape == (3, 32, 32)
        train_items = [i for q in train for i in q.item_ids]
        val_items = [i for q in val for i in q.item_ids]
        assert sorted(train_items) == sorted(tr.ids)  # every image belongs to one product
        assert sorted(val_items) == sorted(va.ids)
        assert not set(tr.ids) & set(va.ids)
        assert all(1 <= len(q.item_ids) <= 3 for q in train + val)
        assert all(isinstance(i, str) for i in train_items + val_items)  # spec 1.5: string gold
        # KB ids are canonical decimal integers (spec 1.1)
        assert len(kb) == 16 and all(str(int(i)) == i for i in kb.ids)
        assert all(str(int(i)) == i for i in tr.ids + va.ids)
    query_ids = [q.query_id for q in train + val]
    assert len(set(query_ids)) == len(query_ids) and all(isinstance(q, int) for q in query_ids)


def test_val_gold_matches_queries(demo: DemoPaths):
    val = read_val_queries(demo.val_queries)
    gold = read_image_gold(demo.val_gold)
    by_query = {q.query_id: set(q.item_ids) for q in val}
    with ImageArchive(demo.val_images) as va:
        assert sorted(g.image_id for g in gold) == sorted(va.ids)  # one line per val image
    for g in gold:
        assert isinstance(g.image_id, str) and len(g.item_ids) == 1
        (query_id,) = g.item_ids
        assert isinstance(query_id, int)  # spec 1.6: gold ids are int query ids
        assert g.image_id in by_query[query_id]


def test_captions_look_like_fashiongen(demo: DemoPaths):
    train = read_train_queries(demo.train_queries)
    for q in train:
        sentences = q.query_text.split(". ")
        assert len(sentences) >= 2 and q.query_text.endswith(".")
        assert q.query_text[0].isupper()
        colours = [c for c in COLOURS if re.search(rf"\b{c}\b", q.query_text.lower())]
        categories = [c for c in CATEGORIES if re.search(rf"\b{c}\b", q.query_text.lower())]
        assert colours and categories, q.query_text
    assert len({q.query_text.split(" ")[0] for q in train}) > 3  # several templates in use


# ---- concepts ----

@pytest.mark.parametrize("kind", ["data", "kb"])
def test_hypernym_trees_closed_and_acyclic(demo: DemoPaths, kind: str):
    q_path, f_path = ((demo.concept_queries, demo.concept_fathers) if kind == "data"
                      else (demo.kb_concept_queries, demo.kb_concept_fathers))
    queries = read_concept_queries(q_path)
    fathers = _fathers(f_path)
    assert [q.phrase for q in queries] == list(fathers)
    assert len({q.query_id for q in queries}) == len(queries)
    assert all(q.query_text == f"a photo of {q.phrase}" for q in queries)
    roots = {p for p, f in fathers.items() if f == ""}
    assert roots == set(CATEGORIES)
    for phrase in fathers:
        seen = [phrase]
        while fathers[seen[-1]]:
            father = fathers[seen[-1]]
            assert father in fathers, f"{seen[-1]!r} has father {father!r} outside the vocabulary"
            assert father not in seen, f"cycle through {seen}"
            assert len(father.split()) < len(seen[-1].split())  # fathers are more general
            seen.append(father)
        assert len(seen) <= 3


def test_vocabularies_overlap_partly_with_three_level_chain(demo: DemoPaths):
    data = _fathers(demo.concept_fathers)
    kb = _fathers(demo.kb_concept_fathers)
    assert data["striped short sleeve t-shirt"] == "short sleeve t-shirt"
    assert data["short sleeve t-shirt"] == "t-shirt" and data["t-shirt"] == ""
    assert data["navy t-shirt"] == "t-shirt"
    assert kb["short sleeve t-shirt"] == "t-shirt" and kb["striped t-shirt"] == "t-shirt"
    assert "striped short sleeve t-shirt" not in kb and "navy t-shirt" not in kb
    both = set(data) & set(kb)
    assert both and set(data) - both and set(kb) - both
    assert (data, kb) == build_vocabularies()


def test_train_phrases_give_data_and_kb_concepts(demo: DemoPaths):
    """Spec 3.2: data concepts are 2..6-word phrases in the data vocabulary and not matched in the
    KB; KB concepts are match_phrases in the KB vocabulary."""
    data = set(_fathers(demo.concept_fathers))
    kb = set(_fathers(demo.kb_concept_fathers))
    train = read_train_queries(demo.train_queries)
    with_data = with_kb = 0
    for q in train:
        assert all(1 <= len(p.split()) <= 6 for p in q.phrases)
        assert len(set(q.phrases)) == len(q.phrases)
        assert set(q.match_phrases) <= kb and set(q.match_phrases) <= set(q.phrases)
        assert [p for p in q.phrases if p in kb] == list(q.match_phrases)
        data_concepts = [p for p in q.phrases
                         if 2 <= len(p.split()) <= 6 and p in data and p not in q.match_phrases]
        kb_concepts = [p for p in q.match_phrases if len(p) >= 2 and p in kb]
        assert data_concepts or kb_concepts
        with_data += bool(data_concepts)
        with_kb += bool(kb_concepts)
    assert with_data >= 0.7 * len(train) and with_kb >= 0.9 * len(train)
    # the phrases are not all concepts: mining also finds phrases outside both vocabularies
    assert any(p not in data and p not in kb for q in train for p in q.phrases)


# ---- determinism and encodings ----

def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, demo: DemoPaths):
    again = _generate(tmp_path / "again")
    assert _digests(again) == _digests(demo)
    other = _digests(_generate(tmp_path / "other", seed=1))
    reference = _digests(demo)
    for name in ("train_queries", "train_images", "val_queries", "val_images", "kb_images"):
        assert other[name] != reference[name], name


def test_regenerating_in_place_replaces_the_dataset(tmp_path: Path):
    fresh = _digests(_generate(tmp_path / "fresh", seed=3))
    _generate(tmp_path / "reused", seed=2)
    assert _digests(_generate(tmp_path / "reused", seed=3)) == fresh
    assert load_demo_manifest(tmp_path / "reused")["config"]["seed"] == 3


def test_uint8_and_float32_encode_the_same_pixels(tmp_path: Path, demo: DemoPaths):
    u8 = _generate(tmp_path / "u8", encoding="uint8_hwc")
    for name in ("train_queries", "val_queries", "val_gold", "concept_fathers", "kb_concept_queries"):
        assert getattr(u8, name).read_bytes() == getattr(demo, name).read_bytes()
    for archive in ("train_images", "val_images", "kb_images"):
        with ImageArchive(getattr(u8, archive)) as a, ImageArchive(getattr(demo, archive)) as f:
            assert a.encoding == "uint8_hwc" and a.image_shape == (32, 32, 3)
            assert a.ids == f.ids
            for image_id in a.ids:
                pixels, chw = a.read(image_id), f.read(image_id)
                np.testing.assert_allclose(chw, normalized_from_pixels(pixels), atol=1e-6)
                np.testing.assert_array_equal(pixels_from_normalized(chw), pixels)


# ---- the drawings show their attributes ----

def _draw(g: Garment, seed: int = 0, size: int = 64):
    return draw_garment(g, size, np.random.default_rng(seed))


@pytest.mark.parametrize("colour", list(COLOURS))
def test_garment_colour_is_the_nearest_named_colour(colour: str):
    pixels, mask = _draw(Garment("t-shirt", "short sleeve", colour, "solid"))
    mean = pixels[mask].astype(float).mean(axis=0)
    nearest = min(COLOURS, key=lambda c: np.sum((np.asarray(COLOURS[c]) - mean) ** 2))
    assert nearest == colour, (colour, mean)


def test_red_garments_are_red_in_the_dataset(tmp_path: Path):
    paths = _generate(tmp_path, train=150, val=4, kb=8, size=16, encoding="uint8_hwc")
    means: dict[str, list[np.ndarray]] = {"red": [], "blue": []}
    with ImageArchive(paths.train_images) as a:
        for q in read_train_queries(paths.train_queries):
            for colour in means:
                if re.search(rf"\b{colour}\b", q.query_text.lower()):
                    means[colour] += [a.read(i).reshape(-1, 3).mean(axis=0) for i in q.item_ids]
    red, blue = (np.mean(means[c], axis=0) for c in ("red", "blue"))
    # whole images, background included: the garment still tips the balance
    assert red[0] > red[1] and red[0] > red[2]
    assert blue[2] > blue[0] and blue[2] > blue[1]
    assert red[0] - red[2] > blue[0] - blue[2] + 20


def test_red_region_of_a_striped_red_garment():
    pixels, mask = _draw(Garment("dress", "short sleeve", "red", "striped"))
    r, g, b = pixels[mask].astype(float).mean(axis=0)
    assert r > g + 40 and r > b + 40


@pytest.mark.parametrize("pattern", ["striped", "checked", "dotted"])
def test_patterns_show_the_contrast_colour(pattern: str):
    def contrast_share(p: str) -> float:
        pixels, mask = _draw(Garment("sweater", "crew neck", "navy", p))
        near = np.abs(pixels.astype(float) - contrast_colour("navy")).max(axis=-1) < 40
        return (near & mask).sum() / mask.sum()

    assert contrast_share("solid") < 0.02
    assert contrast_share(pattern) > 0.15


def test_stripes_are_horizontal_and_checks_are_not():
    def row_col_changes(pattern: str) -> tuple[int, int]:
        pixels, mask = _draw(Garment("skirt", "midi", "black", pattern), size=96)
        light = (pixels.mean(axis=-1) > 128) & mask
        inner = mask[1:, 1:] & mask[:-1, 1:] & mask[1:, :-1]
        along_rows = (light[1:, 1:] != light[1:, :-1]) & inner
        along_cols = (light[1:, 1:] != light[:-1, 1:]) & inner
        return int(along_rows.sum()), int(along_cols.sum())

    rows, cols = row_col_changes("striped")
    assert cols > 5 * max(rows, 1)
    rows, cols = row_col_changes("checked")
    assert rows > 0.5 * cols and cols > 0.5 * rows


@pytest.mark.parametrize("category,larger,smaller", [
    ("t-shirt", "long sleeve", "short sleeve"),
    ("t-shirt", "short sleeve", "sleeveless"),
    ("dress", "long sleeve", "sleeveless"),
    ("skirt", "midi", "mini"),
    ("trousers", "wide leg", "slim"),
])
def test_cuts_change_the_silhouette(category: str, larger: str, smaller: str):
    # same seed: the same view (shift, scale), so only the cut differs
    _, big = _draw(Garment(category, larger, "green", "solid"))
    _, small = _draw(Garment(category, smaller, "green", "solid"))
    assert big.sum() > small.sum() * 1.05
    assert (big ^ small).sum() > 0.1 * small.sum()  # a change of shape, not a few pixels


def test_views_of_a_product_differ_but_stay_alike():
    g = Garment("coat", "", "beige", "checked")
    rng = np.random.default_rng(5)
    (a, mask_a), (b, mask_b) = draw_garment(g, 64, rng), draw_garment(g, 64, rng)
    assert not np.array_equal(a, b)
    assert (mask_a & mask_b).sum() > 0.6 * max(mask_a.sum(), mask_b.sum())


def test_every_category_draws_at_every_size():
    for size in (16, 33, 224):
        for category, cuts in CATEGORIES.items():
            pixels, mask = _draw(Garment(category, (cuts or ("",))[0], "red", "dotted"), size=size)
            assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8
            assert 0.05 < mask.mean() < 0.8, (category, size)


# ---- config checks ----

@pytest.mark.parametrize("field,value,flag", [
    ("size", 15, "--size"), ("size", 513, "--size"), ("size", 32.0, "--size"),
    ("train", 7, "--train"), ("val", 3, "--val"), ("kb", 7, "--kb"),
    ("seed", -1, "--seed"), ("seed", True, "--seed"), ("encoding", "png", "--encoding"),
])
def test_bad_config_names_the_flag(tmp_path: Path, field: str, value, flag: str):
    with pytest.raises(ConfigError, match=re.escape(flag)):
        DemoDataConfig(out=tmp_path, **{field: value})


def test_config_collects_every_problem_and_accepts_edges(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        DemoDataConfig(out=tmp_path, size=8, train=1, encoding="jpeg")
    assert all(flag in str(e.value) for flag in ("--size", "--train", "--encoding"))
    cfg = DemoDataConfig(out=str(tmp_path), size=16, train=8, val=4, kb=8, seed=0,
                         encoding="uint8_hwc")
    assert cfg.out == tmp_path
    assert DemoDataConfig(out=tmp_path, size=512).size == 512
