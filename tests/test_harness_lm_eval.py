"""`python eval.py checkpoint=... harness=lm_eval tasks=...`: lm-evaluation-harness on a checkpoint's LLM as its tuner
leaves it for text-only input, offline on the shipped micro-world task and the micro-world LMs.

Proved here: the scoring equals a direct computation on the HF LLM (Phi and Llama micro-world LMs); MoReS leaves
text-only logits bit-identical to the base LLM's and its hooks see no visual position (while it does steer an image
prompt); through eval.py, MoReS retention is exactly 100.0 and LoRA's is 100 · tuned / base of differing logits;
a rerun never writes over results (same settings: reported again; other settings: a sibling folder)."""
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from factory.checkpoint import load_checkpoint
from factory.config import compose
from factory.constants import IMAGE_TOKEN_INDEX
from factory.errors import FactoryError
from factory.eval.cli import load_config, main
from factory.harness.lm_eval_model import FactoryTextLM
from factory.harness.lm_eval_run import load_base_model, retention_table
from factory.harness.lm_eval_tasks import TASK_DIR, local_task_config, microworld_knowledge_docs, task_specs
from factory.model.build import build_model
from factory.tuners.mores import MoReS
from train_support import make_small_world, train_cfg

PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. USER: Two shapes: a red circle in the top left and "
          "a blue square in the bottom right.\nHow many shapes are there? ASSISTANT:")


class Request:  # what lm-eval hands a model: an Instance with `args`
    def __init__(self, *args):
        self.args = args


def microworld_model(name="tiny"):
    return build_model(compose([f"model={name}"])).eval()


# ----------------------------------------------------------------------------------------------- the shipped task
def test_shipped_task_is_the_generator_output_with_valid_answers():
    lines = (TASK_DIR / "microworld_knowledge.jsonl").read_text().splitlines()
    docs = microworld_knowledge_docs()
    assert [json.loads(line) for line in lines] == docs and len(docs) == 60
    assert {d["question_type"] for d in docs} == {"color", "shape", "count", "position", "existence"}
    for doc in docs:
        assert 0 <= doc["label"] < len(doc["choices"])
    config = local_task_config("microworld_knowledge")
    assert config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(TASK_DIR / "microworld_knowledge.jsonl")
    assert task_specs("microworld_knowledge, mmlu")[1] == "mmlu"  # any other name goes to lm-eval's own index
    with pytest.raises(FactoryError, match="harness.tasks is empty"):
        task_specs(" , ")


# ---------------------------------------------------------------------------------------------- the scoring math
@pytest.mark.parametrize("name", ["tiny", "tiny_llama"])
def test_loglikelihood_equals_the_llm_computed_directly(name):
    model = microworld_model(name)
    lm = FactoryTextLM(model, batch_size=3)
    answers = [" two", " three", " two shapes"]
    scored = lm.loglikelihood([Request(PROMPT, a) for a in answers] + [Request("", "red circle")])
    for answer, (logprob, greedy) in zip(answers, scored):
        context = model.tokenizer.encode(PROMPT, add_special_tokens=False)
        whole = model.tokenizer.encode(PROMPT + answer, add_special_tokens=False)
        with torch.no_grad():
            logits = model.llm(input_ids=torch.tensor([whole])).logits[0].float()
        logp = F.log_softmax(logits, -1)[len(context) - 1:-1]
        target = torch.tensor(whole[len(context):])
        assert logprob == pytest.approx(logp.gather(-1, target[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == target).all())
    assert scored[2][0] < scored[0][0]  # two words are less likely than one
    # the micro-world LM reads the caption: the number of shapes is its greedy answer
    assert scored[0][1] and not scored[1][1]
    # an empty context is conditioned on the end-of-text token (lm-eval's convention)
    rolling = lm.loglikelihood_rolling([Request("red circle")])[0]
    assert rolling == pytest.approx(scored[3][0], abs=1e-4)


def test_generate_until_stops_at_the_stop_string_and_matches_greedy_generation():
    model = microworld_model()
    lm = FactoryTextLM(model, batch_size=2)
    ids = torch.tensor([model.tokenizer.encode(PROMPT, add_special_tokens=False)])
    greedy = model.tokenizer.decode(model.generate(ids, max_new_tokens=6)[0], skip_special_tokens=True)
    full, cut = lm.generate_until([Request(PROMPT, {"until": [], "max_gen_toks": 6}),
                                   Request(PROMPT, {"until": ["w"], "max_gen_toks": 6})])
    assert full == greedy and full.strip() == "two"
    assert cut == full.split("w")[0]
    with pytest.raises(FactoryError, match="greedily only"):
        lm.generate_until([Request(PROMPT, {"do_sample": True, "temperature": 0.7})])


# ------------------------------------------------------------------------------------- trained micro-world runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """MoReS and LoRA checkpoints of the micro-world model (Phi LM), 1 pretrain + 4 instruct steps each."""
    from factory.train import run

    world = make_small_world(tmp_path_factory.mktemp("world"))
    micro = compose(["model=tiny"])
    out = {}
    for tuner in ("mores", "lora"):
        run_dir = tmp_path_factory.mktemp(tuner)
        cfg = train_cfg(run_dir, world, tuner=tuner, **{"trainer.max_steps": 4, "trainer.pretrain.epochs": 0.125,
                                                        "trainer.instruct.lr": 1e-3})
        for key in ("vision", "connector", "llm", "model"):
            cfg[key] = micro[key]
        cfg.init = "pretrained"
        run(cfg)
        out[tuner] = run_dir / "instruct"
    return out


def test_mores_text_only_logits_are_the_base_llms_and_its_hooks_see_no_visual_position(runs):
    tuned = load_checkpoint(runs["mores"])
    base = load_base_model(runs["mores"], "cpu", None, False)
    mores = tuned.llm.mores
    assert isinstance(mores, MoReS) and not hasattr(base.llm, "mores")
    seen, calls = [], []
    original_observe, original_steer = mores.observe_batch, mores.steer
    mores.observe_batch = lambda **kw: (original_observe(**kw), seen.append(mores.positions.clone()))
    mores.steer = lambda key, hidden: (calls.append(key), original_steer(key, hidden))[1]
    text = FactoryTextLM(tuned, batch_size=4)
    rows = [text.tok_encode(PROMPT), text.tok_encode("Three shapes:")]
    with torch.no_grad():
        got, _ = text._logits(rows)
        want, _ = FactoryTextLM(base, batch_size=4)._logits(rows)
    assert torch.equal(got, want)  # bit for bit: the same scores on every text-only task
    assert seen and all(bool((p < 0).all()) for p in seen)  # no position selected in a text-only batch
    assert sorted(set(calls)) == sorted(mores.interventions.keys())  # the hooks ran on every steered layer
    # the same checkpoint does steer an image prompt: MoReS is active, only not on text
    ids = torch.tensor([[IMAGE_TOKEN_INDEX] * tuned.image_token_count + rows[1]])
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        steered = tuned(ids, pixel_values=pixels).logits
        base.connector.load_state_dict(tuned.connector.state_dict())
        plain = base(ids, pixel_values=pixels).logits
    assert not torch.allclose(steered, plain, atol=1e-4)


def run_eval(checkpoint, *args):
    return main([f"checkpoint={checkpoint}", "harness=lm_eval", "tasks=microworld_knowledge", "compare_base=true",
                 "batch_size=16", *args])


def test_eval_py_mores_retention_is_exactly_100_and_lora_is_tuned_over_base(runs, capsys):
    assert run_eval(runs["mores"]) == 0
    mores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mores["retention_pct"] == {"microworld_knowledge": 100.0}
    assert mores["scores"]["microworld_knowledge"] == mores["base_scores"]["microworld_knowledge"] > 0.3
    folder = runs["mores"] / "eval" / "lm_eval"
    assert mores["output_dir"] == str(folder)
    tuned = json.loads((folder / "lm_eval_results.json").read_text())
    base = json.loads((folder / "base_lm_eval_results.json").read_text())
    assert tuned["results"]["microworld_knowledge"]["sample_len"] == 60 == base["n-samples"][
        "microworld_knowledge"]["effective"]
    assert "| microworld_knowledge | acc |" in (folder / "retention.md").read_text()

    assert run_eval(runs["lora"]) == 0
    lora = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    b, t = lora["base_scores"]["microworld_knowledge"], lora["scores"]["microworld_knowledge"]
    assert b == mores["base_scores"]["microworld_knowledge"]  # one base LLM under both checkpoints
    assert lora["retention_pct"]["microworld_knowledge"] == pytest.approx(100 * t / b)
    # LoRA adapted the LLM: its text-only logits are no longer the base LLM's
    adapted = FactoryTextLM(load_checkpoint(runs["lora"]))
    rows = [adapted.tok_encode(PROMPT)]
    assert not torch.allclose(adapted._logits(rows)[0],
                              FactoryTextLM(load_base_model(runs["lora"], "cpu", None, False))._logits(rows)[0],
                              atol=1e-4)


def test_a_rerun_never_writes_over_results(runs, capsys):
    folder = runs["mores"] / "eval" / "lm_eval"
    if not (folder / "lm_eval_results.json").is_file():
        assert run_eval(runs["mores"]) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    assert run_eval(runs["mores"]) == 0  # the same settings: the results already there are reported
    out, err = capsys.readouterr()
    assert "already holds lm-eval results" in err and json.loads(out.splitlines()[-1])["retention_pct"]
    assert run_eval(runs["mores"], "limit=5") == 0  # other settings: a sibling folder, the first one untouched
    other = json.loads(capsys.readouterr().out.splitlines()[-1])["output_dir"]
    assert other.startswith(str(folder) + "-")
    assert json.loads((runs["mores"] / "eval" / other.split("/")[-1] / "lm_eval_results.json").read_text())[
        "results"]["microworld_knowledge"]["sample_len"] == 5
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ---------------------------------------------------------------------------------------------- the command line
def test_eval_py_composes_the_harness_group_and_checks_its_settings(tmp_path, capsys):
    cfg = load_config(["checkpoint=x", "harness=lm_eval", "tasks=[mmlu,hellaswag]", "num_fewshot=5", "limit=10"])
    assert cfg.harness.name == "lm_eval" and list(cfg.tasks) == ["mmlu", "hellaswag"]
    # The spelling: a comma list is a list of tasks, not a Hydra sweep (which would be refused)
    assert list(load_config(["checkpoint=x", "harness=lm_eval", "tasks=mmlu,hellaswag"]).tasks) == ["mmlu", "hellaswag"]
    assert (cfg.num_fewshot, cfg.limit, cfg.compare_base) == (5, 10, False)
    assert OmegaConf.select(load_config(["checkpoint=x"]), "harness") is None  # a benchmark run by default
    assert main(["checkpoint=x", "harness=lm_eval"]) == 2
    assert "harness=lm_eval needs tasks=<lm-eval task names>" in capsys.readouterr().err
    assert main(["checkpoint=x", "harness=lm_eval", "tasks=mmlu", "num_fewshot=-1"]) == 2
    assert "num_fewshot=-1 must be null" in capsys.readouterr().err
    assert main([f"checkpoint={tmp_path}", "harness=lm_eval", "tasks=mmlu"]) == 2
    assert "is not a factory checkpoint" in capsys.readouterr().err


def test_retention_table_divides_tuned_by_base():
    base = {"results": {"a": {"acc,none": 0.5}, "b": {"acc,none": 0.0}, "c": {"word_perplexity,none": 10.0}}}
    tuned = {"results": {"a": {"acc,none": 0.4}, "b": {"acc,none": 0.1}, "c": {"word_perplexity,none": 20.0}}}
    rows = {r["task"]: r for r in retention_table(base, tuned)}
    assert rows["a"]["retention_pct"] == pytest.approx(80.0)
    assert rows["b"]["retention_pct"] is None  # nothing to keep
    assert rows["c"]["retention_pct"] == pytest.approx(50.0)  # lower is better: base / tuned


def test_comma_lists_turns_only_unbracketed_list_keys_into_lists_and_leaves_sweeps_alone():
    from factory.command_line import comma_lists

    assert comma_lists(["tasks=a,b", "limit=3"]) == ["tasks=[a,b]", "limit=3"]
    assert comma_lists(["tasks=[a,b]", "tasks='a,b'", "tasks=a"]) == ["tasks=[a,b]", "tasks='a,b'", "tasks=a"]
    assert comma_lists(["-m", "tasks=a,b"]) == ["-m", "tasks=a,b"]  # under multirun a comma list is a sweep
    assert comma_lists(["tuner=mores,lora"]) == ["tuner=mores,lora"]  # other keys keep Hydra's meaning
