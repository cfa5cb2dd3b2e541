"""The factory inside lmms-eval (factory/harness/lmms_eval_*.py): a checkpoint answers lmms-eval's requests exactly
as eval.py answers a benchmark, and the micro-world task scores what eval.py benchmark=microworld scores."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from factory.checkpoint import load_checkpoint
from factory.data.images import open_image
from factory.errors import FactoryError
from factory.eval.generate import answer_questions, decode, generate_ids, load_questions, prepare_batch
from factory.harness.lmms_eval_model import FactoryRequestAnswerer, cut_at_stop_strings, lmms_class
from train_support import make_small_world, train_cfg

LIMIT = 16  # questions of the held-out split (16 in the small world) both evaluations answer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model fully tuned for 40 steps per stage: it answers "yes" to most questions, so the micro-world score
    is above zero, and both evaluations must get the same numbers from the same answers."""
    from factory.train.recipe import run

    tmp = tmp_path_factory.mktemp("lmms")
    world = make_small_world(tmp / "world")
    run(train_cfg(tmp / "run", world, tuner="full", **{"trainer.max_steps": 80}))
    return tmp / "run" / "instruct", world


@pytest.fixture(scope="module")
def mores_model(tmp_path_factory):
    """A tiny model with the MoReS tuner whose steering weights are far from zero (steering changes answers)."""
    from factory.testing import tiny_model
    from factory.tuners import apply_tuning

    torch.manual_seed(0)
    model = tiny_model(layers=2)
    apply_tuning(model, OmegaConf.create({"name": "mores", "rank": 1, "layers": "all", "positions": "all",
                                          "modality": "vision", "dropout": 0.0}),
                 {"vision": "frozen", "connector": "full", "llm": "tuner"})
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mores" in name:
                param.normal_(0, 2.0)
    model.template = "phi"
    world = tmp_path_factory.mktemp("mw")
    from factory.data.microworld import generate_microworld

    generate_microworld(world, seed=0, num_train_images=1, num_eval_images=6, image_size=32)
    return model.eval(), world


def requests_for(questions, folder, gen_kwargs, task="t", split="test"):
    """lmms-eval generate_until Instances as the evaluator builds them: (context, gen_kwargs, doc_to_visual,
    doc_id, task, split); the documents live in task_dict, as lmms-eval puts them there."""
    docs = [{"question": q["text"].replace("<image>", "").strip(), "image": str(folder / q["image"])}
            for q in questions]
    requests = [SimpleNamespace(args=(d["question"], dict(gen_kwargs), lambda doc: [open_image(doc["image"])], i,
                                      task, split)) for i, d in enumerate(docs)]
    return requests, {task: {split: docs}}


def answerer(model, task_dict, **kwargs):
    lm = lmms_class()(model=model, **kwargs)
    lm.task_dict = task_dict
    return lm


def test_microworld_task_scores_what_eval_py_scores_with_the_same_answers(trained, tmp_path, capsys):
    from factory.eval.cli import load_config, main
    from factory.harness.lmms_eval_run import run

    checkpoint, world = trained
    assert main([f"checkpoint={checkpoint}", "benchmark=microworld", f"limit={LIMIT}", "batch_size=4",
                 f"output_dir={tmp_path / 'eval_py'}"]) == 0
    eval_py = json.loads((tmp_path / "eval_py" / "results.json").read_text())
    eval_answers = [json.loads(line) for line in (tmp_path / "eval_py" / "answers.jsonl").read_text().splitlines()]

    cfg = OmegaConf.create(OmegaConf.to_container(load_config([f"checkpoint={checkpoint}", f"limit={LIMIT}",
                                                               "batch_size=4", f"output_dir={tmp_path / 'lmms'}"])))
    cfg.tasks = "factory_microworld"
    cfg.harness = OmegaConf.load(Path(__file__).parents[1] / "configs" / "harness" / "lmms_eval.yaml")
    summary = run(cfg)
    accuracy = summary["results"]["factory_microworld"]["accuracy,none"]
    samples_file = next((tmp_path / "lmms").glob("samples_factory_microworld_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]

    assert len(samples) == len(eval_answers) == LIMIT == eval_py["metrics"]["n"]
    by_id = {row["question_id"]: row["text"] for row in eval_answers}
    assert [s["filtered_resps"][0] for s in samples] == [by_id[s["doc"]["question_id"]] for s in samples]
    assert accuracy == pytest.approx(eval_py["metrics"]["accuracy"]) and accuracy > 0
    assert Path(summary["results_file"]).is_file()
    # a second run writes new files beside the first, never over them
    assert run(cfg)["results_file"] != summary["results_file"]
    assert len(list((tmp_path / "lmms").glob("results_*.json"))) == 2


def test_requests_get_eval_pys_answers_with_mores_steering_the_prompt(mores_model):
    """Batched answers through lmms-eval requests = eval.py's answer_questions (template, transform, KV cache);
    MoReS steers them: zeroing its weights changes the answers."""
    model, world = mores_model
    questions = load_questions(world / "eval.json")
    requests, task_dict = requests_for(questions, world / "images", {"max_new_tokens": 6, "until": []})
    answers = answerer(model, task_dict, batch_size=4).generate_until(requests)
    assert answers == answer_questions(model, questions, world / "images", max_new_tokens=6)
    with torch.no_grad():
        saved = {n: p.clone() for n, p in model.named_parameters() if "mores" in n}
        for name, param in model.named_parameters():
            if "mores" in name:
                param.zero_()
        unsteered = answerer(model, task_dict, batch_size=4).generate_until(requests)
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_(saved[name])
    assert unsteered != answers


def test_until_and_max_new_tokens_are_honoured(mores_model):
    model, world = mores_model
    questions = load_questions(world / "eval.json")[:2]
    batch = prepare_batch(model, [[{"from": "human", "value": q["text"]}] for q in questions],
                          [q["image"] for q in questions], world / "images")
    full = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in generate_ids(model, batch, 8)]
    short = [decode(model, ids) for ids in generate_ids(model, batch, 2)]
    requests, task_dict = requests_for(questions, world / "images", {"max_new_tokens": 2})
    assert answerer(model, task_dict).generate_until(requests) == short
    stop = full[0].strip()[1:3]  # a stop string inside the first answer
    requests, task_dict = requests_for(questions, world / "images", {"max_new_tokens": 8, "until": [stop]})
    got = answerer(model, task_dict).generate_until(requests)
    assert got[0] == full[0][:full[0].find(stop)].strip() and len(got[0]) < len(full[0].strip())
    assert cut_at_stop_strings("a. b\n\nc", ["\n\n", "."]) == "a" and cut_at_stop_strings("abc", []) == "abc"


def test_loglikelihood_scores_the_continuation_after_the_prompt(mores_model):
    model, world = mores_model
    questions = load_questions(world / "eval.json")
    batch = prepare_batch(model, [[{"from": "human", "value": q["text"]}] for q in questions],
                          [q["image"] for q in questions], world / "images")
    # the continuation as generated (not stripped: " D" and "D" are different tokens, as in lmms-eval's " A"); only
    # answers whose text encodes back to the generated ids can be recognised as greedy (a random model may produce
    # a token sequence that is not the tokenizer's own encoding of its text)
    generated = generate_ids(model, batch, 2)
    texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    exact = [i for i, (ids, text) in enumerate(zip(generated, texts))
             if model.tokenizer.encode(text, add_special_tokens=False) == list(ids)]
    assert len(exact) >= 2, texts
    questions = [questions[exact[0]], questions[exact[1]], questions[0]]
    greedy = [texts[exact[0]], texts[exact[1]]]
    requests, task_dict = requests_for(questions, world / "images", {})
    lm = answerer(model, task_dict, batch_size=2)
    continuations = [greedy[0], greedy[1], "zzz qqq"]
    for request, continuation in zip(requests, continuations):
        context, _, visual, doc_id, task, split = request.args
        request.args = (context, continuation, visual, doc_id, task, split)
    scores = lm.loglikelihood(requests)
    alone = answerer(model, task_dict, batch_size=1).loglikelihood(requests)  # no padding
    assert [s[0] for s in scores] == pytest.approx([s[0] for s in alone], abs=1e-4)
    assert scores[0][1] is True and scores[1][1] is True and scores[2][1] is False
    assert all(score < 0 for score, _ in scores) and scores[2][0] < scores[0][0]


def test_bad_requests_and_arguments_are_clear_errors(mores_model):
    model, world = mores_model
    questions = load_questions(world / "eval.json")[:1]
    requests, task_dict = requests_for(questions, world / "images", {"do_sample": True, "temperature": 0.7})
    with pytest.raises(FactoryError, match=r"task 't' asks for do_sample=True.*greedily only"):
        answerer(model, task_dict).generate_until(requests)
    requests, task_dict = requests_for(questions, world / "images", {})
    two = requests[0].args
    requests[0].args = (two[0], two[1], lambda doc: [open_image(doc["image"])] * 2, *two[3:])
    with pytest.raises(FactoryError, match=r"task 't', document 0: the task gives 2 images"):
        answerer(model, task_dict).generate_until(requests)
    with pytest.raises(FactoryError, match=r"Unknown lmms-eval model argument\(s\) for --model factory: tempo"):
        FactoryRequestAnswerer(model=model, tempo=1)
    with pytest.raises(FactoryError, match=r"needs --model_args pretrained=<run_dir>/<stage>"):
        FactoryRequestAnswerer()


def test_lmms_eval_resolves_model_factory_to_the_checkpoint(trained):
    """`--model factory --model_args pretrained=...`: lmms-eval's registry builds the class from the manifest that the
    `lmms_eval.models` entry point (setup.py) returns, and the instance loads the checkpoint."""
    from lmms_eval.api.model import lmms
    from lmms_eval.models import MODEL_REGISTRY_V2

    from factory.harness.lmms_eval_model import lmms_eval_manifest

    MODEL_REGISTRY_V2.register_manifest(lmms_eval_manifest(), overwrite=True)
    cls = MODEL_REGISTRY_V2.get_model_class("factory")
    assert issubclass(cls, lmms) and cls is lmms_class()
    checkpoint, _ = trained
    lm = cls.create_from_arg_string(f"pretrained={checkpoint},batch_size=3", {"device": "cpu"})
    assert lm.batch_size == 3 and lm.model.template == load_checkpoint(checkpoint).template
