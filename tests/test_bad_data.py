"""Bad data cannot kill a long run: data.on_bad_sample (skip / error), counting in the summary and metrics.jsonl,
data.max_bad_fraction, the up-front scan (data.verify_images), tokenization errors naming the sample, non-UTF-8
data files, and the trainer presets' save_every."""
import functools
import json
import logging

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from factory.data import LlavaJsonDataset
from factory.data.llava_json import MIN_SEEN_FOR_FRACTION, data_options, too_many_bad
from factory.data.verify import verify_dataset
from factory.errors import FactoryError
from factory.testing import tiny_tokenizer
from train_support import CONFIGS, make_small_world, read_metrics, train_cfg

BAD_ID = "train_00005_caption"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = make_small_world(tmp_path_factory.mktemp("world"))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "images" / "whole.jpg", quality=95)
    data = (root / "images" / "whole.jpg").read_bytes()
    (root / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG: header fine, pixels cut
    return root


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def pretrain_with_truncated_jpeg(world, tmp_path):
    """The world's stage-1 file with one entry's image replaced by the truncated JPEG."""
    entries = json.loads((world / "pretrain.json").read_text())
    entries[5] = dict(entries[5], id=BAD_ID, image="cut.jpg")
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(entries))
    return path


def caption(sample_id, text="A red circle.", image=None):
    entry = {"id": sample_id, "conversations": [{"from": "human", "value": "<image>\nDescribe." if image else
                                                  "Describe."}, {"from": "gpt", "value": text}]}
    if image:
        entry["image"] = image
    return entry


def dataset(tmp_path, entries, tok, world=None, template="plain", max_length=None, **options):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    transform = (lambda image: torch.zeros(3, 4, 4))
    return LlavaJsonDataset(path, world / "images" if world else None, tok, template, transform, 2, max_length,
                            **options)


# ------------------------------------------------------------------------------------------- mid-run, end to end
def test_truncated_jpeg_mid_run_is_skipped_and_counted(world, tmp_path, caplog):
    from factory.train import run

    data = pretrain_with_truncated_jpeg(world, tmp_path)
    cfg = train_cfg(tmp_path / "run", world, stage="pretrain",
                    **{"data.pretrain.json": str(data), "trainer.pretrain.epochs": 1, "data.on_bad_sample": "skip"})
    with caplog.at_level(logging.WARNING, logger="factory.data.llava_json"):
        summary = run(cfg)
    # one epoch of 64 samples, global batch 8: all 8 steps ran, every micro-batch full, the bad sample met once
    assert summary["stages"]["pretrain"]["steps"] == 8 and summary["stages"]["pretrain"]["bad_samples"] == 1
    records = read_metrics(tmp_path / "run")
    counts = [r["bad_samples"] for r in records]
    assert len(records) == 8 and counts == sorted(counts) and counts[-1] == 1
    meta = json.loads((tmp_path / "run" / "pretrain" / "meta.json").read_text())
    assert meta["complete"] and meta["bad_samples"] == 1
    warnings = [r.getMessage() for r in caplog.records if BAD_ID in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("Skipping a bad sample (data.on_bad_sample=skip; it is replaced by the next good "
                                  "sample, 1 bad of ")
    assert (f"Cannot read image {world / 'images' / 'cut.jpg'} of sample id '{BAD_ID}' ({data}, entry 5): "
            f"OSError: ") in warnings[0] and warnings[0].endswith("Replace the file or remove the sample.")


def test_truncated_jpeg_mid_run_with_error_names_the_sample(world, tmp_path):
    from factory.train import run

    data = pretrain_with_truncated_jpeg(world, tmp_path)
    cfg = train_cfg(tmp_path / "run", world, stage="pretrain",
                    **{"data.pretrain.json": str(data), "trainer.pretrain.epochs": 1, "data.on_bad_sample": "error"})
    with pytest.raises(FactoryError) as err:
        run(cfg)
    message = str(err.value)
    assert message.startswith(f"Cannot read image {world / 'images' / 'cut.jpg'} of sample id '{BAD_ID}' "
                              f"({data}, entry 5): OSError: ")
    assert message.endswith("Replace the file or remove the sample. (data.on_bad_sample=error; with "
                            "data.on_bad_sample=skip the run would skip it and go on)")


def test_run_defaults_skip_but_the_dataset_class_is_strict(tmp_path, tok):
    assert data_options(OmegaConf.load(CONFIGS / "data" / "llava_v15.yaml")) == data_options(None) == {
        "on_bad_sample": "skip", "max_bad_fraction": 0.01, "max_aspect_ratio": 20.0, "allow_outside_paths": False}
    assert dataset(tmp_path, [caption("a")], tok).on_bad_sample == "error"
    with pytest.raises(FactoryError, match=r"data.on_bad_sample = 'drop' is not one of \('error', 'skip'\)"):
        dataset(tmp_path, [caption("a")], tok, on_bad_sample="drop")
    for key, value, message in (
            ("max_bad_fraction", 2, "`data.max_bad_fraction` must be a number in [0, 1], got 2; the default is 0.01."),
            ("max_aspect_ratio", "wide", "`data.max_aspect_ratio` must be a number in [1, inf] or null, got 'wide'"),
            ("allow_outside_paths", "false", "`data.allow_outside_paths` must be true or false, got 'false'.")):
        with pytest.raises(FactoryError) as err:
            data_options(OmegaConf.create({key: value}))
        assert str(err.value).startswith(message)
    assert data_options(OmegaConf.create({"max_aspect_ratio": None}))["max_aspect_ratio"] is None


# ------------------------------------------------------------------------------------------------------- text
def test_lone_surrogate_names_file_entry_and_id(tmp_path, tok):
    entries = [caption("ok-1"), caption("emoji-7", text="A smiley \ud83d here."), caption("ok-2")]
    ds = dataset(tmp_path, entries, tok, on_bad_sample="error")
    with pytest.raises(FactoryError) as err:
        ds[1]
    assert str(err.value).startswith(
        f"{tmp_path / 'data.json'}, entry 1 (id 'emoji-7'): turn 2 (gpt) holds '\\ud83d' at character 10, a lone "
        f"UTF-16 surrogate that is not valid Unicode text")
    skipping = dataset(tmp_path, entries, tok, on_bad_sample="skip")
    item = skipping[1]
    assert item["id"] == "ok-2" and [b["id"] for b in item["bad_samples"]] == ["emoji-7"]
    assert skipping.num_bad == 1 and "bad_samples" not in skipping[0]


def test_skipped_samples_reach_the_batch_from_dataloader_workers(tmp_path, tok):
    from factory.data import collate

    entries = [caption(f"s{i}", text="x \udc80" if i in (2, 5) else "A red circle.") for i in range(8)]
    ds = dataset(tmp_path, entries, tok, on_bad_sample="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=functools.partial(collate, pad_token_id=0))
    batches = list(loader)
    assert [b["ids"] for b in batches] == [["s0", "s1", "s3", "s3"], ["s4", "s6", "s6", "s7"]]  # full batches
    assert [[bad["id"] for bad in b["bad_samples"]] for b in batches] == [["s2"], ["s5"]]
    assert batches[1]["bad_samples"][0]["where"] == f"{tmp_path / 'data.json'}, entry 5"


def test_tokenizer_failures_name_the_sample(tmp_path, tok):
    class Broken:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *args, **kwargs):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

        encode = __call__

    path = tmp_path / "data.json"
    path.write_text(json.dumps([caption("c-1")]))
    ds = LlavaJsonDataset(path, None, tok, "plain", None, 2)
    ds.tokenizer = Broken()
    with pytest.raises(FactoryError) as err:
        ds[0]
    assert str(err.value).startswith(f"{path}, entry 0 (id 'c-1'): the tokenizer cannot encode this entry's text "
                                     f"(TypeError: TextEncodeInput must be")


def test_non_utf8_file_names_line_and_column(tmp_path, tok):
    lines = [json.dumps(caption("a")), json.dumps(caption("b")),
             json.dumps(caption("c", text="Caf\u00e9 sign.")).replace("\\u00e9", "\u00e9")]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(FactoryError) as err:
        LlavaJsonDataset(path, None, tok, "plain", None, 2)
    column = lines[2].index("\u00e9") + 1
    assert str(err.value) == (
        f"{path} is not UTF-8 text: byte 0xe9 at line 3, column {column} (byte offset "
        f"{len(lines[0]) + len(lines[1]) + 2 + column - 1}) cannot be decoded (invalid continuation byte). LLaVA data "
        f"files must be UTF-8; convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT` if it was written as Latin-1.")


# ------------------------------------------------------------------------------------------- max_bad_fraction
def test_too_many_bad_rule():
    assert MIN_SEEN_FOR_FRACTION == 100
    assert not too_many_bad(5, 99, 0.01)      # not judged before 100 samples
    assert not too_many_bad(1, 100, 0.01) and too_many_bad(2, 100, 0.01)
    assert not too_many_bad(10, 1000, 0.01) and too_many_bad(11, 1000, 0.01)
    assert too_many_bad(1, 100, 0.0)


def test_max_bad_fraction_stops_the_run(tmp_path, tok):
    # every 8th sample is bad, the limit 5 %: reading index 7 + 8m tries m + 1 bad and 9m + 8 samples in all, so the
    # first bad one met from 100 samples on (m = 11: 12 bad of 107) stops it
    entries = [caption(f"s{i}", text="Bad \udc80 text." if i % 8 == 7 else "A blue square.") for i in range(160)]
    ds = dataset(tmp_path, entries, tok, on_bad_sample="skip", max_bad_fraction=0.05)
    with pytest.raises(FactoryError) as err:
        for i in range(len(ds)):
            ds[i]
    assert str(err.value) == (
        f"12 of the 107 samples seen so far in {tmp_path / 'data.json'} (this process) were bad (skipped, see the "
        f"warnings above), more than data.max_bad_fraction=0.05: the data has a systematic problem rather than a "
        f"few corrupt files. Run once with data.verify_images=true to list every bad sample, fix or remove them, "
        f"or raise data.max_bad_fraction.")
    ok = dataset(tmp_path, entries, tok, on_bad_sample="skip", max_bad_fraction=0.2)
    assert len({ok[i]["id"] for i in range(len(ok))}) == 140 and ok.num_bad == 20


def test_nothing_usable(tmp_path, tok):
    ds = dataset(tmp_path, [caption("x", text="\ud800")] * 3, tok, on_bad_sample="skip")
    expected = r"No sample of .*data.json can be used: all 3 are bad \(see the warnings above\). Fix the data.$"
    with pytest.raises(FactoryError, match=expected):
        ds[0]


# ------------------------------------------------------------------------------------------------ verify_images
def faulty_entries(world):
    (world / "images" / "html.png").write_text("<html>404</html>")
    Image.new("RGB", (25000, 1)).save(world / "images" / "strip.png")
    long_text = "Where is the red circle and how many shapes are next to it? " * 20
    return [caption("good-0", image="train_00000.png"), caption("cut-1", image="cut.jpg"),
            caption("html-2", image="html.png"), caption("surrogate-3", text="x \ud800 y"),
            caption("strip-4", image="strip.png"),
            {"id": "long-5", "image": "train_00001.png", "conversations": [
                {"from": "human", "value": f"{long_text}\n<image>"}, {"from": "gpt", "value": "Left."}]},
            caption("good-6", image="train_00002.png"), caption("both-7", text="\udc80", image="cut.jpg")]


def test_verify_lists_every_fault_at_once(world, tmp_path, tok):
    ds = dataset(tmp_path, faulty_entries(world), tok, world, template="phi", max_length=64, image_first=False,
                 on_bad_sample="error")
    with pytest.raises(FactoryError) as err:
        verify_dataset(ds, tmp_path / "run", "pretrain", workers=2)
    message = str(err.value)
    report = tmp_path / "run" / "data_faults_pretrain.txt"
    assert message.startswith(f"data.verify_images: 8 samples of {tmp_path / 'data.json'} checked in ")
    assert (": 4 unreadable images, 2 texts that cannot be tokenized, 1 over-length sample.\n"
            "  - [unreadable image] Cannot "
            f"read image {world / 'images' / 'cut.jpg'} of sample id 'cut-1'") in message
    for sample in ("'html-2'", "(id 'surrogate-3'): turn 2 (gpt) holds '\\ud800'", "'strip-4'", "'long-5'"):
        assert sample in message
    assert "good-0" not in message and "good-6" not in message
    assert f"The full list is in {report}.\nFix or remove these samples, or set data.on_bad_sample=skip" in message
    lines = report.read_text().splitlines()
    assert [line.split("]")[0] + "]" for line in lines] == [
        "[unreadable image]", "[unreadable image]", "[text that cannot be tokenized]", "[unreadable image]",
        "[over-length sample]", "[text that cannot be tokenized]", "[unreadable image]"]  # both faults of both-7


def test_verify_with_skip_marks_the_bad_samples(world, tmp_path, tok):
    ds = dataset(tmp_path, faulty_entries(world), tok, world, on_bad_sample="skip", max_bad_fraction=0.7)
    faults = verify_dataset(ds, None, "pretrain", workers=2)
    assert [f.index for f in faults] == [1, 2, 3, 4, 7, 7] and ds.num_bad == 5
    assert [ds[i]["id"] for i in range(len(ds))] == ["good-0", "long-5", "long-5", "long-5", "long-5", "long-5",
                                                     "good-6", "good-0"]
    strict = dataset(tmp_path, faulty_entries(world), tok, world, on_bad_sample="skip")
    with pytest.raises(FactoryError, match=r"5 of the 8 samples are bad, more than data.max_bad_fraction=0.01"):
        verify_dataset(strict, None, "pretrain", workers=2)


def test_verify_images_in_a_run_stops_before_training(world, tmp_path):
    from factory.train import run

    data = pretrain_with_truncated_jpeg(world, tmp_path)
    cfg = train_cfg(tmp_path / "run", world, stage="pretrain",
                    **{"data.pretrain.json": str(data), "data.verify_images": True, "data.on_bad_sample": "error"})
    expected = rf"(?s)checked in .* s: 1 unreadable image\.\n.*sample id '{BAD_ID}'"
    with pytest.raises(FactoryError, match=expected) as err:
        run(cfg)
    assert "64 samples" in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "run")
    assert (tmp_path / "run" / "data_faults_pretrain.txt").read_text().count("\n") == 1


def test_verify_images_checks_every_stage_before_the_first_trains(world, tmp_path):
    from factory.train import run

    entries = json.loads((world / "instruct.json").read_text())
    entries[3] = dict(entries[3], id="bad-instruct-3", image="cut.jpg")
    (tmp_path / "instruct.json").write_text(json.dumps(entries))
    cfg = train_cfg(tmp_path / "run", world, stage="all",
                    **{"data.instruct.json": str(tmp_path / "instruct.json"), "data.verify_images": True,
                       "data.on_bad_sample": "error"})
    with pytest.raises(FactoryError) as err:
        run(cfg)
    message = str(err.value)
    # the stage-2 file was scanned with stage 1's; only the file with faults is in the message
    assert message.startswith(f"data.verify_images: 64 samples of {tmp_path / 'instruct.json'} checked in ")
    assert "pretrain.json" not in message
    assert "sample id 'bad-instruct-3'" in message and (tmp_path / "run" / "data_faults_instruct.txt").is_file()
    assert not (tmp_path / "run" / "pretrain").exists()  # stage 1 never trained


def test_verify_images_scans_each_file_once_per_run(world, tmp_path, monkeypatch):
    from factory.data import verify
    from factory.train import run

    scanned = []
    real_scan = verify.scan
    monkeypatch.setattr(verify, "scan", lambda dataset, workers=None: scanned.append(dataset.json_path) or
                        real_scan(dataset, workers, progress=False))
    data = pretrain_with_truncated_jpeg(world, tmp_path)
    cfg = train_cfg(tmp_path / "run", world, stage="all",
                    **{"data.pretrain.json": str(data), "data.verify_images": True, "data.max_bad_fraction": 0.05,
                       "trainer.max_steps": 1})
    summary = run(cfg)
    assert scanned == [str(data), str(world / "instruct.json")]  # both at stage 1; stage 2 reuses its result
    assert set(summary["stages"]) == {"pretrain", "instruct"}
    assert (tmp_path / "run" / "data_faults_pretrain.txt").read_text().count(BAD_ID) == 1


# ------------------------------------------------------------------------------------------------- save_every
def test_trainer_presets_save_every():
    assert OmegaConf.load(CONFIGS / "trainer" / "paper.yaml").save_every == 50
    assert OmegaConf.load(CONFIGS / "trainer" / "microworld.yaml").save_every == 100
