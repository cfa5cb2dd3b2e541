"""Evaluation inputs a user may get wrong or that may be hostile: question files that are not UTF-8 or hold a lone
surrogate, image paths leading out of eval's image_folder, and chat.py's explicit image= path."""
import json
import os

import pytest
from PIL import Image

from factory.errors import FactoryError
from factory.eval.generate import check_image_paths, load_questions
from factory.eval.benchmark_run import run_benchmark
from factory.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2).eval()


@pytest.fixture()
def folders(tmp_path):
    """images/ with one picture, and a secret picture next to it (outside the folder)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(images / "in.png")
    Image.new("RGB", (16, 16), (250, 0, 0)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", images / "link.png")
    return tmp_path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_question_file_not_utf8_names_file_line_and_column(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"question_id": 1, "text": "ok"}\n{"question_id": 2, "text": "caf\xe9"}\n')
    with pytest.raises(FactoryError) as err:
        load_questions(path)
    assert str(err.value) == (
        f"{path} is not UTF-8 text: byte 0xe9 at line 2 (question id 2), column 32 (byte offset 64) cannot be "
        f"decoded (invalid continuation byte). Question, answer and annotation files must be UTF-8; convert it, e.g. "
        f"`iconv -f latin1 -t utf-8 IN > OUT` if it was written as Latin-1.")
    # a JSON document (not one row per line) names line and column only
    doc = tmp_path / "q.json"
    doc.write_bytes(b'[{"question_id": 1,\n  "text": "caf\xe9"}]')
    with pytest.raises(FactoryError, match=r"q.json is not UTF-8 text: byte 0xe9 at line 2, column 15 "):
        load_questions(doc)


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_lone_surrogate_in_a_question_names_file_place_and_id(tmp_path, layout):
    rows = [{"question_id": "a", "text": "fine"}, {"question_id": "b7", "text": "What is \ud83d this?"}]
    if layout == "jsonl":
        path = write_jsonl(tmp_path / "q.jsonl", rows)  # json.dumps writes the lone "\ud83d" escape
        place = "line 2"
    else:
        path = tmp_path / "q.json"
        path.write_text(json.dumps([{"id": r["question_id"], "conversations": [{"from": "human", "value": r["text"]},
                                                                              {"from": "gpt", "value": "x"}]}
                                    for r in rows]))
        place = "entry 1"
    with pytest.raises(FactoryError) as err:
        load_questions(path)
    assert str(err.value) == (
        f"{path}, {place} (question id 'b7'): the question text holds '\\ud83d' at character 9, a lone UTF-16 "
        f"surrogate that is not valid Unicode text (often an emoji cut in half by the tool that wrote the file). "
        f"Fix or remove the question.")


@pytest.mark.parametrize("name, how", [("{secret}", "is an absolute path"), ("../secret.png", "climbs out with '..'"),
                                       ("link.png", "leads through a symlink to")])
def test_image_paths_outside_image_folder_are_refused_unless_allowed(model, folders, name, how):
    name = name.format(secret=folders / "secret.png")
    qfile = write_jsonl(folders / "q.jsonl", [{"question_id": 1, "text": "Color?", "image": "in.png"},
                                              {"question_id": 2, "text": "Color?", "image": name}])
    with pytest.raises(FactoryError) as err:
        run_benchmark(model, "gqa", qfile, folders / "out", image_folder=folders / "images", max_new_tokens=1,
                      progress=False)
    message = str(err.value)
    assert message.startswith(f"Image path {name!r} of question id 2 ({qfile}, line 2) {how}")
    assert message.endswith("set allow_outside_paths=true (eval.py) if the question file is yours and the layout is "
                            "meant.")
    assert not (folders / "out" / "answers.part0.jsonl").exists()  # refused before anything was generated

    result = run_benchmark(model, "gqa", qfile, folders / "out", image_folder=folders / "images", max_new_tokens=1,
                           progress=False, allow_outside_paths=True)
    assert result["n_questions"] == 2 and result["generated_this_run"] == 2


def test_inside_paths_and_a_linked_image_folder_pass(folders):
    os.symlink(folders / "images", folders / "linked")
    questions = [{"question_id": 1, "image": "in.png"}, {"question_id": 2, "image": "./in.png"},
                 {"question_id": 3, "image": None}]
    check_image_paths(questions, folders / "images")
    check_image_paths(questions, folders / "linked")


def test_eval_py_option_and_its_check(tmp_path, capsys):
    from factory.eval.cli import load_config, main

    assert load_config(["checkpoint=x"]).allow_outside_paths is False
    assert load_config(["checkpoint=x", "allow_outside_paths=true"]).allow_outside_paths is True
    assert main(["checkpoint=x", "allow_outside_paths=maybe"]) == 2
    assert "allow_outside_paths" in capsys.readouterr().err


def test_chat_image_that_is_a_folder_says_so(tmp_path, model):
    from factory.eval.chat import ChatSession

    with pytest.raises(FactoryError, match=f"The image {tmp_path} is a folder, not a picture file"):
        ChatSession(model, str(tmp_path))
    with pytest.raises(FactoryError, match="does not exist"):
        ChatSession(model, str(tmp_path / "missing.png"))
    # the user's own path is not confined to any folder: a picture anywhere is used
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "anywhere.png")
    assert ChatSession(model, str(tmp_path / "anywhere.png")).pixel_values is not None
