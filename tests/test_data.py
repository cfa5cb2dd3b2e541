"""LlavaJsonDataset (loading, validation errors, images, truncation/skipping) and collate."""
import functools
import json
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from factory.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from factory.data import LlavaJsonDataset, collate, get_template
from factory.data.templates import move_image_first
from factory.errors import FactoryError
from factory.testing import tiny_tokenizer

N = 4
SIZE = 8


def image_transform(image):
    array = np.asarray(image.resize((SIZE, SIZE)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def entry(sample_id, *values, image=None):
    out = {"id": sample_id, "conversations": turns(*values)}
    if image is not None:
        out["image"] = image
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("red.png", (220, 40, 40)), ("blue.png", (50, 80, 230))):
        Image.new("RGB", (12, 10), colour).save(folder / name)
    return folder


def write(tmp_path, entries, jsonl=False, name=None):
    path = tmp_path / (name or ("data.jsonl" if jsonl else "data.json"))
    text = "\n".join(json.dumps(e) for e in entries) + "\n" if jsonl else json.dumps(entries, indent=1)
    path.write_text(text)
    return path


def dataset(path, tok, images=None, template="phi", max_length=None, **options):
    return LlavaJsonDataset(path, images, tok, template, image_transform, N, max_length, **options)


GOOD = [
    entry("img-1", "<image>\nWhat colour is the shape?", "The shape is red.", image="red.png"),
    entry("txt-1", "How many shapes are there?", "There are three shapes.", "Is there a star?", "No."),
    entry("img-2", "Where is it?\n<image>", "On the left.", image="blue.png"),
]


@pytest.mark.parametrize("jsonl", [False, True])
def test_items_match_the_template(tmp_path, images, tok, jsonl):
    ds = dataset(write(tmp_path, GOOD, jsonl), tok, images)
    assert len(ds) == 3 and ds.has_image == [True, False, True]
    template = get_template("phi")
    for i, raw in enumerate(GOOD):
        item = ds[i]
        assert set(item) - {"bad_samples"} == {"id", "input_ids", "labels", "pixel_values"} and item["id"] == raw["id"]
        expected = template.encode(move_image_first(raw["conversations"]), tok, N)  # LLaVA's image-first rule
        assert item["input_ids"].dtype == item["labels"].dtype == torch.long
        assert item["input_ids"].tolist() == expected.input_ids and item["labels"].tolist() == expected.labels
        if "image" in raw:
            assert item["pixel_values"].shape == (3, SIZE, SIZE) and item["pixel_values"].dtype == torch.float32
            assert int((item["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == N
        else:
            assert item["pixel_values"] is None and IMAGE_TOKEN_INDEX not in item["input_ids"].tolist()
    red = ds[0]["pixel_values"]
    assert torch.allclose(red[:, 0, 0], torch.tensor([220, 40, 40]) / 255.0)


@pytest.mark.parametrize("image_first", [True, False])
def test_image_first_moves_the_marker_unless_turned_off(tmp_path, images, tok, image_first):
    """data.image_first (default true): "Where is it?\\n<image>" is trained as "<image>\\nWhere is it?" (LLaVA's
    preprocess_multimodal); false keeps the file's placement. The entry itself is never modified."""
    raw = entry("img-last", "  Where is it?\n<image>  ", "On the left.", image="blue.png")
    ds = dataset(write(tmp_path, [raw]), tok, images, image_first=image_first)
    ids = ds[0]["input_ids"].tolist()
    template = get_template("phi")
    moved = template.encode(turns("<image>\nWhere is it?", "On the left."), tok, N).input_ids
    kept = template.encode(turns("  Where is it?\n<image>  ", "On the left."), tok, N).input_ids
    assert moved != kept
    assert ids == (moved if image_first else kept)
    start = ids.index(IMAGE_TOKEN_INDEX)
    assert (tok.decode([t for t in ids[:start] if t >= 0]).find("Where") < 0) == image_first
    assert ds.entries[0]["conversations"][0]["value"] == "  Where is it?\n<image>  "


def loads_with_error(tmp_path, entries, tok, images=None, jsonl=False):
    path = write(tmp_path, entries, jsonl)
    with pytest.raises(FactoryError) as err:
        dataset(path, tok, images)
    return str(err.value)


def test_malformed_json_names_line_and_column(tmp_path, tok):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b" "conversations": []}\n]')
    with pytest.raises(FactoryError) as err:
        dataset(path, tok)
    assert str(path) in str(err.value) and "line 3" in str(err.value) and "column" in str(err.value)


def test_malformed_jsonl_names_the_line(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD[1]) + "\n\n" + '{"id": "x", "conversations": [}\n')
    with pytest.raises(FactoryError) as err:
        dataset(path, tok)
    assert f"{path}, line 3" in str(err.value) and "column" in str(err.value)


@pytest.mark.parametrize("bad, message", [
    ({"conversations": turns("q", "a")}, "missing key(s) 'id'"),
    ({"id": "s7"}, "missing key(s) 'conversations'"),
    (entry("s7", "q", "a", "q2"), "ends with a human turn"),
    ({"id": "s7", "conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "roles must be"),
    ({"id": "s7", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "a"}]}, "alternate"),
    ({"id": "s7", "conversations": [{"from": "human"}]}, "keys `from` and `value`"),
    (entry("s7", "What is it?", "A cat.", image="red.png"), "has no <image> marker"),
    (entry("s7", "<image>\nWhat is it?", "A cat."), "has no `image` but"),
    (entry("s7", "<image>\n<image>\nWhat?", "Two.", image="red.png"), "2 times"),
    (entry("s7", "What?", "A cat.", "<image>\nAnd now?", "A dog.", image="red.png"), "first human turn"),
    ("just a string", "must be a JSON object"),
])
@pytest.mark.parametrize("jsonl", [False, True])
def test_bad_entries_name_file_position_and_id(tmp_path, images, tok, bad, message, jsonl):
    text = loads_with_error(tmp_path, [GOOD[0], bad], tok, images, jsonl)
    assert message in text
    where = f"data.jsonl, line 2" if jsonl else "data.json, entry 1"
    assert where in text and str(tmp_path) in text
    if isinstance(bad, dict) and "id" in bad:
        assert "'s7'" in text


@pytest.mark.parametrize("content", ["[]", "", "\n\n"])
def test_empty_dataset(tmp_path, tok, content):
    path = tmp_path / "empty.json"
    path.write_text(content)
    with pytest.raises(FactoryError, match="holds no samples"):
        dataset(path, tok)


def test_missing_data_file(tmp_path, tok):
    with pytest.raises(FactoryError, match="does not exist"):
        dataset(tmp_path / "nope.json", tok)


def test_missing_images_are_found_at_load(tmp_path, images, tok):
    entries = GOOD + [entry("gone-1", "<image>\nq", "a", image="gone1.png"),
                      entry("gone-2", "<image>\nq", "a", image="sub/gone2.png")]
    text = loads_with_error(tmp_path, entries, tok, images)
    assert str(images / "gone1.png") in text and "'gone-1'" in text and "2 of the 4 images" in text


def test_image_entries_need_an_image_folder(tmp_path, tok):
    assert "image_folder" in loads_with_error(tmp_path, GOOD, tok, images=None)


def test_corrupt_image_raises_at_getitem(tmp_path, images, tok):
    (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = dataset(write(tmp_path, GOOD + [entry("corrupt-9", "<image>\nq", "a", image="bad.png")]), tok, images)
    assert ds[0]["pixel_values"] is not None
    with pytest.raises(FactoryError) as err:
        ds[3]
    assert str(images / "bad.png") in str(err.value) and "'corrupt-9'" in str(err.value)


def test_truncation_skips_image_cut_samples_and_truncates_text(tmp_path, images, tok, caplog):
    template = get_template("phi")
    long_question = "Where is the red circle and how many shapes are next to it? " * 3
    entries = [entry("long-img", f"{long_question}\n<image>", "Left.", image="red.png"),
               entry("short-img", "<image>\nColour?", "Red.", image="red.png"),
               entry("long-txt", long_question, "Three shapes are next to it, on the right.")]
    short_len = len(template.encode(entries[1]["conversations"], tok, N).input_ids)
    long_img_start = template.encode(entries[0]["conversations"], tok, N).input_ids.index(IMAGE_TOKEN_INDEX)
    max_length = max(short_len, N + 2)
    assert long_img_start + N > max_length  # the first sample's image would be cut
    # image_first=False keeps the image after the long question, where max_length cuts it
    ds = dataset(write(tmp_path, entries), tok, images, max_length=max_length, image_first=False)
    with caplog.at_level(logging.WARNING, logger="factory.data.llava_json"):
        first = ds[0]
        again = ds[0]
    assert first["id"] == again["id"] == "short-img"  # substituted by the next sample that fits
    assert ds.num_skipped == 1
    warnings = [r for r in caplog.records if "long-img" in r.getMessage()]
    assert len(warnings) == 1 and "max_length" in warnings[0].getMessage()
    assert ds.encode(0) is None
    text = ds[2]
    assert text["id"] == "long-txt" and len(text["input_ids"]) == len(text["labels"]) == max_length
    assert ds.num_skipped == 1


def test_all_samples_cut_and_too_small_max_length(tmp_path, images, tok):
    long_question = "Where is the red circle and how many shapes are next to it? " * 3
    ds = dataset(write(tmp_path, [entry("a", f"{long_question}<image>", "x", image="red.png")]), tok, images,
                 max_length=N + 8)
    with pytest.raises(FactoryError, match="Every sample"):
        ds[0]
    with pytest.raises(FactoryError, match="max_length"):
        dataset(write(tmp_path, GOOD, name="small.json"), tok, images, max_length=N)


def fake_item(sample_id, length, image=None):
    ids = torch.arange(10, 10 + length)
    labels = ids.clone()
    labels[: length // 2] = IGNORE_INDEX
    return {"id": sample_id, "input_ids": ids, "labels": labels, "pixel_values": image}


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_either_side(side):
    red, blue = torch.zeros(3, SIZE, SIZE), torch.ones(3, SIZE, SIZE)
    batch = [fake_item("a", 3, red), None, fake_item("b", 5), fake_item("c", 2, blue)]
    out = collate(batch, pad_token_id=0, padding_side=side)
    assert out["ids"] == ["a", "b", "c"]
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (3, 5)
    assert out["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert torch.equal(out["pixel_values"][0], red) and torch.equal(out["pixel_values"][1], blue)
    assert out["attention_mask"].sum(1).tolist() == [3, 5, 2]
    for row, item in enumerate(b for b in batch if b is not None):
        n = len(item["input_ids"])
        real = slice(0, n) if side == "right" else slice(5 - n, 5)
        pad = slice(n, 5) if side == "right" else slice(0, 5 - n)
        assert torch.equal(out["input_ids"][row, real], item["input_ids"])
        assert torch.equal(out["labels"][row, real], item["labels"])
        assert (out["input_ids"][row, pad] == 0).all() and (out["labels"][row, pad] == IGNORE_INDEX).all()
        assert (out["attention_mask"][row, pad] == 0).all() and (out["attention_mask"][row, real] == 1).all()


def test_collate_without_images_and_errors():
    out = collate([fake_item("a", 2), fake_item("b", 2)], pad_token_id=7)
    assert out["pixel_values"] is None and out["input_ids"].shape == (2, 2)
    with pytest.raises(FactoryError, match="padding_side"):
        collate([fake_item("a", 2)], 0, padding_side="middle")
    with pytest.raises(FactoryError, match="pad_token_id"):
        collate([fake_item("a", 2)], None)
    with pytest.raises(FactoryError, match="share a shape"):
        collate([fake_item("a", 2, torch.zeros(3, 4, 4)), fake_item("b", 2, torch.zeros(3, 8, 8))], 0)


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloader_end_to_end(tmp_path, images, tok, workers):
    ds = dataset(write(tmp_path, GOOD), tok, images, template="vicuna_v1")
    # what training passes (recipe.build_dataset); it must survive worker processes
    collator = pickle.loads(pickle.dumps(functools.partial(collate, pad_token_id=tok.pad_token_id)))
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collator, num_workers=workers))
    assert [b["ids"] for b in batches] == [["img-1", "txt-1"], ["img-2"]]
    first = batches[0]
    assert first["pixel_values"].shape == (1, 3, SIZE, SIZE)
    assert int((first["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == N
    assert ((first["labels"] != IGNORE_INDEX) <= (first["attention_mask"] == 1)).all()
