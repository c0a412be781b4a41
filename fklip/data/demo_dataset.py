"""A procedurally generated demo dataset in the original's layout (spec section 1).

Garments of a few categories, cuts, colours and patterns (drawn by `fklip.data.garments`), with
FashionGen-like captions, two concept vocabularies with hypernym trees, and a knowledge base (KB) of
concept images. Everything comes from one `np.random.default_rng(seed)` and is written in a fixed
order, so one config always gives byte-identical files. `demo.json` is written last: its presence
means the dataset is complete.

Vocabularies (each a closed is-a tree whose roots are the categories):

- data (`fashion-gen_concepts_*`): "<cut> <cat>", "<colour> <cat>", "<pattern> <cut> <cat>",
  "<colour> <cut> <cat>", and for categories without cuts "<pattern> <cat>", "<colour> <pattern> <cat>";
- KB (`icbu_concepts_*`): "<cut> <cat>" and "<pattern> <cat>".

So "striped short sleeve t-shirt" is-a "short sleeve t-shirt" is-a "t-shirt"; the cut concepts are
in both vocabularies, the colour and multi-attribute ones only in the data vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fklip.data.archive import ENCODINGS, ArchiveWriter, normalized_from_pixels
from fklip.data.garments import (
    CATEGORIES,
    COLOURS,
    PATTERNS,
    SOLID_ONLY,
    Garment,
    draw_garment,
)
from fklip.errors import ConfigError, DataError, raise_collected
from fklip.io import foreign_files, staged_folder, write_json, write_jsonl

logger = logging.getLogger(__name__)

FORMAT = "fklip-demo"
VERSION = 1
MAX_VIEWS = 3  # views (images) per product: 1..3

MATERIALS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("cotton", "jersey", "linen"), "shirt": ("cotton", "linen", "poplin"),
    "sweater": ("wool", "cashmere", "cotton"), "hoodie": ("cotton", "fleece"),
    "dress": ("silk", "cotton", "crepe"), "skirt": ("wool", "denim", "satin"),
    "trousers": ("wool", "denim", "twill"), "shorts": ("denim", "cotton", "nylon"),
    "jacket": ("denim", "leather", "nylon"), "coat": ("wool", "cashmere", "twill"),
    "bag": ("leather", "canvas", "nylon"), "sunglasses": ("acetate", "metal"),
}
DETAILS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("Crew neck collar.", "Rib knit crewneck collar.", "Logo printed at chest."),
    "shirt": ("Spread collar.", "Button closure at front.", "Single patch pocket at chest."),
    "sweater": ("Rib knit cuffs and hem.", "Dropped shoulders.", "Relaxed fit."),
    "hoodie": ("Drawstring hood.", "Kangaroo pocket.", "Rib knit cuffs and hem."),
    "dress": ("Concealed zip closure at back.", "Seam at waist.", "Flared skirt."),
    "skirt": ("Elasticized waistband.", "Concealed zip closure at side.", "A-line silhouette."),
    "trousers": ("Four-pocket styling.", "Zip-fly.", "Belt loops at waistband."),
    "shorts": ("Belt loops at waistband.", "Five-pocket styling.", "Raw edge at hem."),
    "jacket": ("Zip closure at front.", "Notched lapel.", "Welt pockets at waist."),
    "coat": ("Notched lapel.", "Double-breasted button closure.", "Flap pockets at waist."),
    "bag": ("Twin carry handles.", "Magnetic clasp at flap.", "Textile lining."),
    "sunglasses": ("Tinted lenses.", "Logo at temples.", "Protective case included."),
}
CLOSINGS = ("Tonal stitching.", "Silver-tone hardware.", "Logo patch at back.", "Unlined.")
PATTERN_SENTENCES = {
    "striped": ("Striped pattern throughout.", "Stripes throughout."),
    "checked": ("Checked pattern throughout.", "Check pattern throughout."),
    "dotted": ("Dotted pattern throughout.", "Polka dot pattern throughout."),
}
KEEP_PHRASE = 0.85  # mining misses some phrases, as the original's spaCy mining does


@dataclass(frozen=True)
class DemoDataConfig:
    """What `fklip demo-data` generates; checked on construction."""

    out: Path
    seed: int = 0
    size: int = 64          # image side in pixels
    train: int = 500        # train products (= train queries), each with 1..3 views
    val: int = 150          # val products (= val queries)
    kb: int = 400           # knowledge-base images
    encoding: str = "float32_chw"

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        problems = []

        def check_int(flag: str, value: object, low: int, high: int | None = None) -> None:
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{flag} must be an integer, got {value!r}")
            elif value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                problems.append(f"{flag} must be {bound}, got {value}")

        check_int("--size", self.size, 16, 512)
        check_int("--train", self.train, 8)
        check_int("--val", self.val, 4)
        check_int("--kb", self.kb, 8)
        check_int("--seed", self.seed, 0)
        if self.encoding not in ENCODINGS:
            problems.append(f"--encoding must be one of {', '.join(sorted(ENCODINGS))}, "
                            f"got {self.encoding!r}")
        raise_collected(problems, "invalid demo dataset options", ConfigError)


@dataclass(frozen=True)
class DemoPaths:
    """Every file of a demo dataset, in the original's layout under `root`."""

    root: Path
    train_queries: Path
    train_images: Path
    concept_queries: Path
    concept_fathers: Path
    val_queries: Path
    val_images: Path
    val_gold: Path
    kb_concept_queries: Path
    kb_concept_fathers: Path
    kb_images: Path
    manifest: Path

    def files(self) -> dict[str, Path]:
        """Every file but the manifest, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("root", "manifest")}


def demo_paths(out: Path, size: int) -> DemoPaths:
    """The layout of a demo dataset at `out` with images of `size` pixels."""
    out = Path(out)
    train, val, kb = out / "fashiongen" / "train", out / "fashiongen" / "val", out / "fashion_kb"
    return DemoPaths(
        root=out,
        train_queries=train / "fashion-gen_train_queries_phrases.jsonl",
        train_images=train / f"train.{size}.npz",
        concept_queries=train / "fashion-gen_concepts_queries.jsonl",
        concept_fathers=train / "fashion-gen_concepts_fathers.jsonl",
        val_queries=val / "fashion-gen_val_queries.jsonl",
        val_images=val / f"val.{size}.npz",
        val_gold=val / "fashion-gen_val_images.jsonl",
        kb_concept_queries=kb / "icbu_concepts_queries.jsonl",
        kb_concept_fathers=kb / "icbu_concepts_fathers.jsonl",
        kb_images=kb / f"icbu_train_images_5w_00.{size}.npz",
        manifest=out / "demo.json",
    )


def _patterns(category: str) -> tuple[str, ...]:
    return ("solid",) if category in SOLID_ONLY else PATTERNS


def build_vocabularies() -> tuple[dict[str, str], dict[str, str]]:
    """(data, KB) vocabularies as phrase -> father ("" for a root), in a fixed order."""
    data: dict[str, str] = {}
    kb: dict[str, str] = {}
    for cat, cuts in CATEGORIES.items():
        data[cat] = kb[cat] = ""
        pats = [p for p in _patterns(cat) if p != "solid"]
        for cut in cuts:
            data[f"{cut} {cat}"] = kb[f"{cut} {cat}"] = cat
        for pat in pats:
            kb[f"{pat} {cat}"] = cat
        for colour in COLOURS:
            data[f"{colour} {cat}"] = cat
        for cut in cuts:
            for pat in pats:
                data[f"{pat} {cut} {cat}"] = f"{cut} {cat}"
            for colour in COLOURS:
                data[f"{colour} {cut} {cat}"] = f"{cut} {cat}"
        if not cuts:
            for pat in pats:
                data[f"{pat} {cat}"] = cat
                for colour in COLOURS:
                    data[f"{colour} {pat} {cat}"] = f"{pat} {cat}"
    return data, kb


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def sample_garment(rng: np.random.Generator, category: str = "", cut: str = "",
                   pattern: str = "") -> Garment:
    """A random garment; the attributes given are kept, the others drawn."""
    category = category or _pick(rng, list(CATEGORIES))
    cuts = CATEGORIES[category]
    cut = cut or (_pick(rng, cuts) if cuts else "")
    if not pattern:
        # about half the garments are solid, so the patterned ones stay a distinct signal
        pats = _patterns(category)
        pattern = "solid" if len(pats) == 1 or rng.random() < 0.45 else _pick(rng, pats[1:])
    return Garment(category, cut, _pick(rng, list(COLOURS)), pattern)


def _words(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def caption_and_phrases(g: Garment, rng: np.random.Generator) -> tuple[str, list[str]]:
    """A FashionGen-like caption, and the candidate phrases (1..6 words) mined from it."""
    material = _pick(rng, MATERIALS[g.category])
    pat = "" if g.pattern == "solid" else g.pattern
    template = int(rng.integers(3))
    if template == 0:
        head = f"{_words(g.cut, material, g.category)} in {g.colour}."
    elif template == 1:
        head = f"{_words(pat, g.cut, g.category)} in {g.colour} {material}."
    else:
        head = f"{_words(g.colour, pat, g.cut, g.category)} in {material}."
    sentences = [head[0].upper() + head[1:]]
    if pat and (template == 0 or rng.random() < 0.5):
        sentences.append(_pick(rng, PATTERN_SENTENCES[pat]))
    details = DETAILS[g.category]
    for i in sorted(rng.choice(len(details), size=int(rng.integers(1, 3)), replace=False)):
        sentences.append(details[int(i)])
    if rng.random() < 0.6:
        sentences.append(_pick(rng, CLOSINGS))

    cat, cut, colour = g.category, g.cut, g.colour
    candidates = [colour, _words(cut, cat), _words(pat, cat), _words(colour, cat),
                  _words(pat, cut, cat) if cut else "", _words(colour, cut, cat) if cut else "",
                  _words(colour, pat, cat) if pat and not cut else "", _words(material, cat)]
    candidates += [s.rstrip(".").lower() for s in sentences[1:]]
    phrases = [cat]  # the category is always found
    for p in candidates:
        if p and p not in phrases and len(p.split()) <= 6 and rng.random() < KEEP_PHRASE:
            phrases.append(p)
    return " ".join(sentences), phrases


def _concept_lines(vocab: dict[str, str]) -> tuple[list[dict], list[dict]]:
    queries = [{"query_id": i, "query_text": f"a photo of {p}", "phrase": p}
               for i, p in enumerate(vocab)]
    fathers = [{"query_id": i, "phrase": p, "phrase_father": f}
               for i, (p, f) in enumerate(vocab.items())]
    return queries, fathers


class _ImageSink:
    """Writes views into an archive in the requested encoding, handing out fresh image ids."""

    def __init__(self, writer: ArchiveWriter, encoding: str, size: int, next_id: int):
        self.writer, self.encoding, self.size, self.next_id = writer, encoding, size, next_id
        self.count = 0

    def add(self, g: Garment, rng: np.random.Generator) -> str:
        pixels, _ = draw_garment(g, self.size, rng)  # (H, W, 3) uint8
        image = normalized_from_pixels(pixels) if self.encoding == "float32_chw" else pixels
        image_id = str(self.next_id)  # canonical decimal: no leading zeros (spec 1.1)
        self.writer.add(image_id, image)
        self.next_id += 1
        self.count += 1
        return image_id


def _products(sink: _ImageSink, n: int, first_query_id: int, rng: np.random.Generator,
              desc: str, progress: bool) -> list[dict]:
    """n products, each a caption with 1..3 views written to `sink`."""
    records = []
    for q in tqdm(range(n), desc=desc, unit="product", disable=not progress):
        g = sample_garment(rng)
        caption, phrases = caption_and_phrases(g, rng)
        views = int(rng.integers(1, MAX_VIEWS + 1))
        item_ids = [sink.add(g, rng) for _ in range(views)]
        records.append({"query_id": first_query_id + q, "query_text": caption,
                        "item_ids": item_ids, "phrases": phrases})
    return records


def _attributes(kb_phrase: str) -> dict[str, str]:
    """The category, cut or pattern a KB concept fixes ("striped t-shirt" -> pattern, category)."""
    for cat, cuts in CATEGORIES.items():
        if kb_phrase == cat:
            return {"category": cat}
        for cut in cuts:
            if kb_phrase == f"{cut} {cat}":
                return {"category": cat, "cut": cut}
        for pat in PATTERNS:
            if kb_phrase == f"{pat} {cat}":
                return {"category": cat, "pattern": pat}
    raise ValueError(f"not a KB concept: {kb_phrase!r}")


def settings(cfg: DemoDataConfig) -> dict:
    """What `demo.json` records of the config: everything but the folder."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "out"}


def _not_the_dataset(out: Path) -> list[str]:
    """The files under `out` that are not the demo dataset's (its demo.json lists them)."""
    manifest = load_demo_manifest(out)
    own = ["demo.json", *manifest.get("files", {}).values()] if manifest is not None else []
    return foreign_files(out, own)


def _refuse_foreign(out: Path) -> None:
    foreign = _not_the_dataset(out) if out.is_dir() else []
    if foreign:
        raise ConfigError(f"--out {out} holds files that are not the demo dataset ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); fklip replaces only what it made: move them, "
                          "or choose another folder")


def check_demo_out(cfg: DemoDataConfig, overwrite: bool = False) -> bool:
    """Whether `cfg.out` already holds this very dataset (True: nothing to do). A folder that does
    not exist or is empty is fine (False); a demo dataset of other settings is replaced only with
    `overwrite`, and only when it holds nothing else; anything else is refused, `overwrite` or
    not: fklip replaces only what it made."""
    out = cfg.out
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a folder for the demo dataset")
    manifest = load_demo_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise ConfigError(f"--out {out} is not empty and holds no demo dataset (no demo.json); fklip replaces "
                              "only what it made: choose an empty or new folder")
        return False
    if manifest.get("config") == settings(cfg):
        return True
    if not overwrite:
        theirs = manifest.get("config") or {}
        diff = ", ".join(f"{k} {theirs.get(k)!r} (asked {v!r})" for k, v in settings(cfg).items()
                         if theirs.get(k) != v)
        raise ConfigError(f"--out {out} holds a demo dataset made with other settings ({diff}); pass --overwrite "
                          "to replace it, or choose another folder")
    _refuse_foreign(out)
    return False


def generate_demo(cfg: DemoDataConfig, progress: bool = False) -> DemoPaths:
    """Generate the demo dataset at `cfg.out` and return its paths. It is built in a hidden folder
    beside `cfg.out` and swapped into place whole (replacing one there: see `check_demo_out` for
    what a caller should check first; files that are not the dataset's are refused again just
    before the swap), so an interrupted run leaves no partial dataset."""
    with staged_folder(cfg.out, recheck=lambda: _refuse_foreign(cfg.out)) as tmp:
        _generate(dataclasses.replace(cfg, out=tmp), progress)
    return demo_paths(cfg.out, cfg.size)


def _generate(cfg: DemoDataConfig, progress: bool) -> None:
    paths = demo_paths(cfg.out, cfg.size)
    rng = np.random.default_rng(cfg.seed)
    data_vocab, kb_vocab = build_vocabularies()
    logger.info("generating demo data in %s (%d train, %d val products, %d KB images, %d px)",
                cfg.out, cfg.train, cfg.val, cfg.kb, cfg.size)

    # image ids are one counter across train, val and KB, so every id is unique
    with ArchiveWriter(paths.train_images) as writer:
        train_sink = _ImageSink(writer, cfg.encoding, cfg.size, next_id=1)
        train = _products(train_sink, cfg.train, 0, rng, "train", progress)
    for record in train:
        record["match_phrases"] = [p for p in record["phrases"] if p in kb_vocab]

    with ArchiveWriter(paths.val_images) as writer:
        val_sink = _ImageSink(writer, cfg.encoding, cfg.size, next_id=train_sink.next_id)
        val = _products(val_sink, cfg.val, cfg.train, rng, "val", progress)
    gold = [{"image_id": i, "item_ids": [r["query_id"]]} for r in val for i in r["item_ids"]]

    # KB images: a garment with one concept's attributes and random others. Concepts come in
    # rounds of shuffled vocabularies, so each gets kb // len(kb_vocab) images or one more, and a
    # KB smaller than the vocabulary covers a random subset of it
    kb_phrases = list(kb_vocab)
    rounds = -(-cfg.kb // len(kb_phrases))
    order = np.concatenate([rng.permutation(len(kb_phrases)) for _ in range(rounds)])[:cfg.kb]
    with ArchiveWriter(paths.kb_images) as writer:
        kb_sink = _ImageSink(writer, cfg.encoding, cfg.size, next_id=val_sink.next_id)
        for c in tqdm(order, desc="kb", unit="image", disable=not progress):
            kb_sink.add(sample_garment(rng, **_attributes(kb_phrases[int(c)])), rng)

    write_jsonl(paths.train_queries, train)
    write_jsonl(paths.val_queries, [{k: r[k] for k in ("query_id", "query_text", "item_ids")}
                                    for r in val])
    write_jsonl(paths.val_gold, gold)
    for vocab, q_path, f_path in ((data_vocab, paths.concept_queries, paths.concept_fathers),
                                  (kb_vocab, paths.kb_concept_queries, paths.kb_concept_fathers)):
        queries, fathers = _concept_lines(vocab)
        write_jsonl(q_path, queries)
        write_jsonl(f_path, fathers)

    write_json(paths.manifest, {
        "format": FORMAT,
        "version": VERSION,
        "config": settings(cfg),
        "counts": {"train_queries": len(train), "train_images": train_sink.count,
                   "val_queries": len(val), "val_images": val_sink.count,
                   "kb_images": kb_sink.count, "data_concepts": len(data_vocab),
                   "kb_concepts": len(kb_vocab)},
        "files": {name: p.relative_to(paths.root).as_posix() for name, p in paths.files().items()},
    })
    logger.info("demo data: %d train images, %d val images, %d KB images",
                train_sink.count, val_sink.count, kb_sink.count)


def load_demo_manifest(out: Path) -> dict | None:
    """The parsed `demo.json` of a complete demo dataset at `out`, or None when there is none."""
    path = demo_paths(out, 0).manifest
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed demo manifest ({e}); delete it and regenerate the "
                        "demo data") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a demo manifest (expected \"format\": \"{FORMAT}\"); "
                        "delete it and regenerate the demo data")
    return manifest
