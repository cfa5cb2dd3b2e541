"""python -m factory.data.inspect: the training tokenization of every entry, as text or JSON lines."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from factory.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from factory.data import LlavaJsonDataset, get_template
from factory.data.inspect import main
from factory.data.templates import encode_conversation
from factory.errors import FactoryError

N = 3


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


GOOD = [
    {"id": "img-last", "image": "red.png", "conversations": turns("What is this?\n<image>", "A cat.")},
    {"id": "txt", "conversations": turns("Hi", "Hello.", "Say </s>", "You said </s> .")},
]
BAD = [
    {"id": "two-images", "image": "red.png", "conversations": turns("<image>\nq", "a", "<image>\nq2", "a2")},
    {"id": "no-marker", "image": "red.png", "conversations": turns("q", "a")},
    {"conversations": turns("q", "a")},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in GOOD + BAD) + "\n")
    return path


def run_json(capsys, *argv):
    code = main([*map(str, argv), "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return code, lines


@pytest.mark.parametrize("template, folder", [("vicuna_v1", "llama"), ("phi", "gpt2/phi2_codegen")])
def test_json_lines_are_what_training_tokenizes(tmp_path, capsys, real_tokenizers, data_file, template, folder):
    tokenizer_dir = real_tokenizers / folder
    code, rows = run_json(capsys, data_file, "--template", template, "--tokenizer", tokenizer_dir,
                          "--num-image-tokens", N)
    assert code == 1  # some entries are rejected
    assert [row["id"] for row in rows] == ["img-last", "txt", "two-images", "no-marker", None]
    assert [set(row) for row in rows] == [{"id", "input_ids", "labels"}] * 2 + [{"id", "error"}] * 3

    # the same ids and labels as the training dataset's items (images exist here; the inspector never opens them)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    good_file = tmp_path / "good.json"
    good_file.write_text(json.dumps(GOOD))
    dataset = LlavaJsonDataset(good_file, tmp_path, tok, template,
                               lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1), N)
    for i, row in enumerate(rows[:2]):
        assert row["input_ids"] == dataset[i]["input_ids"].tolist()
        assert row["labels"] == dataset[i]["labels"].tolist()
    first = rows[0]
    assert first["input_ids"].count(IMAGE_TOKEN_INDEX) == N
    expected = encode_conversation(get_template(template), turns("<image>\nWhat is this?", "A cat."), tok, N)
    assert first["input_ids"] == expected.input_ids  # the image moved first, as in training
    assert tok.decode([t for t in first["labels"] if t != IGNORE_INDEX]).strip() == "A cat." + tok.eos_token
    # text is text: the '</s>' typed in the answer is trained as characters, only the closing EOS is a control id
    answer_ids = [t for t in rows[1]["labels"] if t != IGNORE_INDEX]
    assert answer_ids.count(tok.eos_token_id) == 2 and "You said </s> ." in tok.decode(answer_ids)

    assert "may only appear in the first human turn" in rows[2]["error"] and "line 3" in rows[2]["error"]
    assert "has no <image> marker" in rows[3]["error"] and "line 4" in rows[3]["error"]
    assert "missing key(s) 'id'" in rows[4]["error"]


def test_text_output_marks_pieces_image_and_trained_spans(capsys, real_tokenizers, data_file):
    code = main([str(data_file), "--template", "vicuna_v1", "--tokenizer", str(real_tokenizers / "llama"),
                 "--num-image-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 1
    # LLaVA-1.5's prompt around the image: the lone ▁ of "USER: ", the image span, the space piece, the newline
    assert "▁US ER : ▁ <image>×4 ▁ <0x0A> What ▁is ▁this ? ▁A SS IST ANT : [[ ▁A ▁cat . </s> ]]" in out
    assert "== id 'img-last'" in out and "tokens, 4 trained" in out
    assert "== id 'two-images': REJECTED" in out
    assert out.strip().endswith("5 entries, 2 encoded, 3 rejected (template 'vicuna_v1', 4 image tokens)")


def test_keep_image_placement_and_max_length(capsys, real_tokenizers, data_file):
    args = [data_file, "--template", "phi", "--tokenizer", real_tokenizers / "gpt2" / "phi2_codegen",
            "--num-image-tokens", N]
    _, moved = run_json(capsys, *args)
    _, kept = run_json(capsys, *args, "--keep-image-placement")
    assert moved[0]["input_ids"] != kept[0]["input_ids"] and moved[1] == kept[1]
    assert kept[0]["input_ids"].index(IMAGE_TOKEN_INDEX) > moved[0]["input_ids"].index(IMAGE_TOKEN_INDEX)
    start = moved[0]["input_ids"].index(IMAGE_TOKEN_INDEX)
    _, cut = run_json(capsys, *args, "--max-length", start + 1)
    assert "cuts this entry's image span; training skips it" in cut[0]["error"]
    assert len(cut[1]["input_ids"]) == start + 1  # text-only entries are truncated, as in training


def test_unusable_inputs_exit_2_with_one_message(tmp_path, capsys, real_tokenizers, data_file):
    llama = str(real_tokenizers / "llama")
    assert main([str(tmp_path / "missing.json"), "--template", "phi", "--tokenizer", llama]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(data_file), "--template", "vicuna", "--tokenizer", llama]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vicuna_v1" in err
    assert main([str(data_file), "--template", "phi", "--tokenizer", str(tmp_path / "nowhere")]) == 2
    assert "Could not load the tokenizer" in capsys.readouterr().err


def test_runs_as_a_module(tmp_path, real_tokenizers):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GOOD[:1]))
    result = subprocess.run([sys.executable, "-m", "factory.data.inspect", str(path), "--template", "phi",
                             "--tokenizer", str(real_tokenizers / "gpt2" / "phi2_codegen"), "--json",
                             "--num-image-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert row["id"] == "img-last" and row["input_ids"].count(IMAGE_TOKEN_INDEX) == 2


class FailingTokenizer:
    """The real tokenizer, except that it fails (as a tokenizer's own code may) on text holding 'BOOM'."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text, *args, **kwargs):
        if "BOOM" in text:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return self._tokenizer.encode(text, *args, **kwargs)


def test_text_and_tokenizer_failures_are_the_entrys_line_with_trainings_message(tmp_path, capsys, real_tokenizers):
    """A lone surrogate (an emoji cut in half) or any tokenizer failure is that entry's error line, worded as the
    training loader words it, and the other entries are still reported."""
    from transformers import AutoTokenizer

    from factory.data.inspect import inspect_entries
    from factory.data.llava_json import BadSampleError

    entries = [{"id": "cut-emoji", "conversations": turns("Hi \ud83d there", "Hello.")},
               {"id": "boom", "conversations": turns("Say BOOM", "No.")},
               GOOD[1]]
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")  # json writes the lone "\ud83d" escape

    code, rows = run_json(capsys, path, "--template", "vicuna_v1", "--tokenizer", real_tokenizers / "llama")
    assert code == 1
    assert [set(row) for row in rows] == [{"id", "error"}, {"id", "input_ids", "labels"}, {"id", "input_ids", "labels"}]
    assert rows[0] == {"id": "cut-emoji", "error": (
        f"{path}, line 1 (id 'cut-emoji'): turn 1 (human) holds '\\ud83d' at character 4, a lone UTF-16 surrogate "
        f"that is not valid Unicode text (often an emoji cut in half by the tool that wrote the file); fix or "
        f"remove the text.")}

    tok = FailingTokenizer(AutoTokenizer.from_pretrained(str(real_tokenizers / "llama")))
    template = get_template("vicuna_v1")
    report = list(inspect_entries(str(path), template, tok, num_image_tokens=N))
    dataset = LlavaJsonDataset(path, None, tok, template, None, N)
    for i in (0, 1):  # the sample's message training logs (skip) or raises (error, with the option's note after it)
        with pytest.raises(BadSampleError) as raised:
            dataset.tokenize(i)
        assert report[i]["error"] == str(raised.value)
        with pytest.raises(FactoryError, match="data.on_bad_sample=error") as raised:
            dataset[i]
        assert str(raised.value).startswith(report[i]["error"])
    assert report[1]["error"] == (
        f"{path}, line 2 (id 'boom'): the tokenizer cannot encode this entry's text (TypeError: TextEncodeInput must "
        f"be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]). Fix or remove the entry.")
    assert report[2]["input_ids"] == dataset[2]["input_ids"].tolist()

    # the text mode shows the same message in the entry's REJECTED block
    assert main([str(path), "--template", "vicuna_v1", "--tokenizer", str(real_tokenizers / "llama")]) == 1
    out = capsys.readouterr().out
    assert f"== id 'cut-emoji': REJECTED\n{rows[0]['error']}\n" in out
    assert "Traceback" not in out and "3 entries, 2 encoded, 1 rejected" in out
