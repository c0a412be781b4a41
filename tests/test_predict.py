"""`fklip predict` against the original's algorithm (tests/original_eval.py) on hand-built cases."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from fklip.cli import cli
from tests import original_eval
from tests.conftest import run_fklip, write_lines


def make_case(tmp_path, n_img=12, n_txt=7, dim=4, seed=0, id_types=(str, int)):
    """Features on a coarse grid (exact dot products, many exact ties) and multi-positive gold."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-2, 3, size=(n_img, dim)) / 4.0
    txt = rng.integers(-2, 3, size=(n_txt, dim)) / 4.0
    for m in (img, txt):  # an all-zero feature is refused (never L2-normalised): give it a value
        m[~m.any(axis=1), 0] = 0.25
    img_ids = [id_types[0](900 + i) for i in range(n_img)]
    txt_ids = [id_types[1](10 + j) for j in range(n_txt)]
    write_lines(tmp_path / "img.jsonl", [{"image_id": i, "feature": f.tolist()} for i, f in zip(img_ids, img)])
    write_lines(tmp_path / "txt.jsonl", [{"query_id": q, "feature": f.tolist()} for q, f in zip(txt_ids, txt)])
    # each text has 1..3 gold images; each image's gold is the texts that list it (or one text)
    text_gold = {q: [img_ids[int(i)] for i in rng.choice(n_img, size=1 + j % 3, replace=False)]
                 for j, q in enumerate(txt_ids)}
    image_gold = {i: [q for q, imgs in text_gold.items() if i in imgs] or [txt_ids[0]] for i in img_ids}
    write_lines(tmp_path / "val_queries.jsonl", [{"query_id": q, "query_text": f"caption {q}", "item_ids": v}
                                                 for q, v in text_gold.items()])
    write_lines(tmp_path / "val_images.jsonl", [{"image_id": i, "item_ids": v} for i, v in image_gold.items()])
    return img_ids, img.tolist(), txt_ids, txt.tolist(), text_gold, image_gold


def predict_args(tmp_path, img="img.jsonl", txt="txt.jsonl", chunk=32768, **extra):
    args = ["predict", "--image-feats", str(tmp_path / img), "--text-feats", str(tmp_path / txt),
            "--top-k", "10", "--eval-batch-size", str(chunk),
            "--output-images", str(tmp_path / "out" / "imgs_pred.jsonl"),
            "--output-texts", str(tmp_path / "out" / "txts_pred.jsonl"),
            "--text-standard-path", str(tmp_path / "val_queries.jsonl"),
            "--image-standard-path", str(tmp_path / "val_images.jsonl"),
            "--text-out-path", str(tmp_path / "out" / "text_output.json"),
            "--image-out-path", str(tmp_path / "out" / "image_output.json")]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def outputs(tmp_path):
    return {p.name: p.read_text() for p in sorted((tmp_path / "out").iterdir())}


def oracle_outputs(img_ids, img, txt_ids, txt, text_gold, image_gold):
    t2i = original_eval.predict(txt_ids, txt, img_ids, img, 10)
    i2t = original_eval.predict(img_ids, img, txt_ids, txt, 10)
    return {
        "txts_pred.jsonl": "".join(json.dumps({"query_id": q, "item_ids": v}) + "\n" for q, v in t2i.items()),
        "imgs_pred.jsonl": "".join(json.dumps({"image_id": i, "item_ids": v}) + "\n" for i, v in i2t.items()),
        "text_output.json": original_eval.evaluate(text_gold, t2i),
        "image_output.json": original_eval.evaluate(image_gold, i2t),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_original_on_ties_and_multi_positive_gold(tmp_path, seed):
    case = make_case(tmp_path, seed=seed)
    result = run(predict_args(tmp_path))
    assert result.exit_code == 0, result.output
    assert outputs(tmp_path) == oracle_outputs(*case)
    assert "text to image" in result.output and "R@10" in result.output


def test_results_do_not_depend_on_chunk_sizes(tmp_path):
    make_case(tmp_path, n_img=23, n_txt=17, seed=3)
    seen = []
    for chunk, qchunk in ((1, 1), (3, 5), (32768, 4096)):
        assert run(predict_args(tmp_path, chunk=chunk, query_chunk=qchunk, overwrite=True)).exit_code == 0
        seen.append(outputs(tmp_path))
    assert seen[0] == seen[1] == seen[2]


def test_thirds_show_the_original_float_digits(tmp_path):
    # 11 images ranked 0..10 for every query; three gold keys hit at ranks 1, 4 and 9
    write_lines(tmp_path / "img.jsonl", [{"image_id": str(i), "feature": [(11 - i) / 16 if j == i else 0.0
                                                                          for j in range(11)]}
                                         for i in range(11)])
    write_lines(tmp_path / "txt.jsonl", [{"query_id": q, "feature": [1.0] * 11} for q in range(3)])
    write_lines(tmp_path / "val_queries.jsonl", [{"query_id": q, "query_text": "a", "item_ids": [str(i)]}
                                                 for q, i in enumerate([0, 3, 8])])
    write_lines(tmp_path / "val_images.jsonl", [{"image_id": str(i), "item_ids": [i % 3]} for i in range(11)])
    assert run(predict_args(tmp_path)).exit_code == 0
    text = (tmp_path / "out" / "text_output.json").read_text()
    assert text == ('{"success": true, "score": 66.66666666666666, "scoreJson": {"score": 66.66666666666666, '
                    '"mean_recall": 66.66666666666666, "r1": 33.33333333333333, "r5": 66.66666666666666, '
                    '"r10": 100.0}}')
    assert not text.endswith("\n")  # json.dump, no newline, as the original
    ids, feats = original_eval.read_feature_lines(tmp_path / "txt.jsonl")
    img_ids, img = original_eval.read_feature_lines(tmp_path / "img.jsonl")
    gold = {q: [str(i)] for q, i in enumerate([0, 3, 8])}
    assert text == original_eval.evaluate(gold, original_eval.predict(ids, feats, img_ids, img, 10))


def test_missing_gold_key_writes_the_failure_json(tmp_path):
    case = make_case(tmp_path)
    lines = (tmp_path / "val_images.jsonl").read_text().splitlines()
    lines.insert(2, json.dumps({"image_id": "77", "item_ids": [10]}))  # no such image feature
    (tmp_path / "val_images.jsonl").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(cli, predict_args(tmp_path))
    assert result.exit_code == 2
    assert "gold key '77' has no prediction" in result.output
    out = outputs(tmp_path)
    assert out["image_output.json"] == ('{"errorDetail": "77", "errorMsg": "77", "score": 0, '
                                        '"scoreJson": {}, "success": false}')
    assert out["text_output.json"] == oracle_outputs(*case)["text_output.json"]  # the other side is scored


def test_int_and_string_ids_are_normalised(tmp_path):
    """Gold image ids written as ints still match string image ids (the original would score 0)."""
    img_ids, img, txt_ids, txt, text_gold, image_gold = make_case(tmp_path)
    write_lines(tmp_path / "val_queries.jsonl", [{"query_id": str(q), "query_text": "x",
                                                  "item_ids": [int(i) for i in v]} for q, v in text_gold.items()])
    assert run(predict_args(tmp_path)).exit_code == 0
    expected = oracle_outputs(img_ids, img, txt_ids, txt, text_gold, image_gold)
    assert outputs(tmp_path)["text_output.json"] == expected["text_output.json"]


def test_npy_features_give_the_same_outputs(tmp_path):
    from fklip.data.features import read_features, write_features

    make_case(tmp_path, n_img=15, n_txt=9, seed=4)
    assert run(predict_args(tmp_path)).exit_code == 0
    from_jsonl = outputs(tmp_path)
    for name, field in (("img", "image_id"), ("txt", "query_id")):
        f = read_features(tmp_path / f"{name}.jsonl")
        write_features(tmp_path / f"{name}.npy", f.ids, f.matrix, id_field=field, fmt="npy")
    assert run(predict_args(tmp_path, img="img.npy", txt="txt.npy", overwrite=True)).exit_code == 0
    assert outputs(tmp_path) == from_jsonl


@pytest.mark.parametrize("breakage, message", [
    ("nan", "NaN"),
    ("dim", "4-dim features but"),
    ("dupe", "occur more than once"),
    ("gold_absent", "gold ids are not among the image ids"),
    ("empty", "empty"),
])
def test_bad_inputs_leave_no_outputs(tmp_path, breakage, message):
    make_case(tmp_path)
    img = tmp_path / "img.jsonl"
    lines = img.read_text().splitlines()
    if breakage == "nan":
        lines[3] = lines[3].replace("[", "[NaN, ", 1).replace(", NaN", "", 0)
        obj = json.loads(lines[3])
        obj["feature"] = obj["feature"][1:]
        obj["feature"][0] = float("nan")
        lines[3] = json.dumps(obj)
    elif breakage == "dim":
        write_lines(tmp_path / "txt.jsonl", [{"query_id": 10 + j, "feature": [0.5] * 5} for j in range(7)])
    elif breakage == "dupe":
        lines.append(lines[0])
    elif breakage == "gold_absent":
        lines = lines[1:]  # image 900 is gone, but some text's gold may still list it
        write_lines(tmp_path / "val_queries.jsonl", [{"query_id": 10, "query_text": "x", "item_ids": ["900"]}])
    elif breakage == "empty":
        lines = []
    img.write_text("".join(line + "\n" for line in lines))
    result = CliRunner().invoke(cli, predict_args(tmp_path))
    assert result.exit_code == 2, result.output
    assert message.lower() in result.output.lower(), result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_gold_without_query_text_is_enough(tmp_path):
    """The original's predict_evaluate.py reads only query_id and item_ids of the text gold."""
    case = make_case(tmp_path)
    write_lines(tmp_path / "val_queries.jsonl", [{"query_id": q, "item_ids": v} for q, v in case[4].items()])
    result = run(predict_args(tmp_path))
    assert result.exit_code == 0, result.output
    assert outputs(tmp_path) == oracle_outputs(*case)


@pytest.mark.parametrize("gold, record, expected", [
    ("val_queries.jsonl", {"query_id": "11", "item_ids": ["900"]},
     'val_queries.jsonl: bad text-to-image gold file: line 8: duplicate query_id "11" (first on line 2 as 11'),
    ("val_images.jsonl", {"image_id": 905, "item_ids": [10]},
     'val_images.jsonl: bad val images file: line 13: duplicate image_id 905 (first on line 6 as "905"'),
])
def test_repeated_gold_keys_are_refused(tmp_path, gold, record, expected):
    """The original kept the last line of a repeated gold key and scored one query fewer: a
    different recall, silently. fklip refuses the file, naming both lines, and writes nothing."""
    make_case(tmp_path)
    with open(tmp_path / gold, "a") as f:
        f.write(json.dumps(record) + "\n")
    result = run_fklip(*predict_args(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()  # the gold files are read first: no progress bars yet
    assert len(lines) == 1 and lines[0].startswith(f"fklip: error: {tmp_path / gold}"), result.stderr
    assert expected in lines[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_flag_pairs_are_checked(tmp_path):
    make_case(tmp_path)
    result = CliRunner().invoke(cli, ["predict", "--image-feats", str(tmp_path / "img.jsonl"),
                                      "--text-feats", str(tmp_path / "txt.jsonl"),
                                      "--output-texts", str(tmp_path / "p.jsonl"),
                                      "--text-standard-path", str(tmp_path / "val_queries.jsonl")])
    assert result.exit_code == 2 and "--text-standard-path needs --text-out-path" in result.output
    result = CliRunner().invoke(cli, ["predict", "--image-feats", str(tmp_path / "img.jsonl"),
                                      "--text-feats", str(tmp_path / "txt.jsonl")])
    assert result.exit_code == 2 and "nothing to predict" in result.output
