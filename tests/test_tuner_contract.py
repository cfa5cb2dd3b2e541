"""The contract every registered tuner keeps, checked for each name in the TUNERS registry (a tuner added to
factory/tuners is tested here without editing this file):

* attach: apply_tuning attaches it to the LLM of a tiny model (Phi and Llama layouts);
* trainable set: exactly its own parameters train — never one of the LLM's original weights (except `full`, which
  trains exactly those), never the vision encoder or the connector when they are frozen;
* TP*: its count on the meta device for llava_3b is the number documented in docs/params.md;
* save → load: the trainable state dict of a trained model, loaded into a fresh one, gives identical logits;
* generate: cached greedy decoding equals step-by-step argmax without a cache, with no deprecation raised by the
  forward or generate calls (tests/test_transformers_drift.py).
"""
import re
from pathlib import Path

import pytest
import torch

from factory.params import TUNER_CONFIGS, count
from factory.testing import tiny_model
from factory.tuners import apply_tuning, count_parameters, tuner_names
from test_mores import make_batch  # not tests.test_mores: an installed package may own the name `tests`
from test_transformers_drift import deprecations_are_errors

ONLY_LLM = {"vision": "frozen", "connector": "frozen", "llm": "tuner"}
PARAMS_DOC = Path(__file__).resolve().parent.parent / "docs" / "params.md"
TUNERS = tuner_names()


def documented_tp(tuner: str, model: str = "llava_3b") -> int:
    """The `<model> TP* (ours)` cell of the tuner's row in docs/params.md."""
    lines = PARAMS_DOC.read_text().splitlines()
    header = next(line for line in lines if line.startswith("| tuner |"))
    column = [c.strip() for c in header.strip("|").split("|")].index(f"{model} TP* (ours)")
    row = next((line for line in lines if line.startswith(f"| {tuner} |")), None)
    assert row is not None, f"docs/params.md has no row for tuner {tuner!r}: give it a preset " \
                            f"configs/tuner/<name>.yaml (factory.params.TUNER_CONFIGS lists them) and run " \
                            f"`python -m factory.params --table`"
    cell = [c.strip() for c in row.strip("|").split("|")][column]
    return int(re.sub(r"[^0-9]", "", cell))


def greedy_without_cache(model, ids, mask, pixels, steps):
    tokens = []
    for _ in range(steps):
        logits = model(ids, mask, pixels).logits[:, -1]
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return torch.stack(tokens, dim=1).tolist()


def test_every_tuner_config_names_a_registered_tuner_and_every_tuner_is_documented():
    from factory.config import compose

    names = {str(compose([f"tuner={config}"]).tuner.name) for config in TUNER_CONFIGS}
    assert names == set(TUNERS)


def test_every_module_is_discovered_and_every_tuner_class_is_registered_under_its_name():
    """No import list: each file of factory/tuners is imported, and a Tuner class with a `name` that forgot
    @register_tuner (so it would silently not exist) fails here."""
    import importlib
    import inspect

    import factory.tuners
    from factory.registry import TUNERS as REGISTRY
    from factory.tuners import TUNER_MODULES
    from factory.tuners.base import Tuner

    files = {p.stem for p in Path(factory.tuners.__file__).parent.glob("*.py")} - {"__init__"}
    assert {m.rsplit(".", 1)[1] for m in TUNER_MODULES} == files
    classes = {}
    for module_name in TUNER_MODULES:
        for obj in vars(importlib.import_module(module_name)).values():
            if inspect.isclass(obj) and issubclass(obj, Tuner) and obj.__module__ == module_name \
                    and obj.__dict__.get("name"):
                classes[obj.__dict__["name"]] = obj
    assert set(classes) == set(TUNERS)
    assert all(REGISTRY.get(name) is cls for name, cls in classes.items())


@pytest.mark.parametrize("llm", ["phi", "llama"])
@pytest.mark.parametrize("tuner", TUNERS)
def test_attach_and_trainable_set(tuner, llm):
    model = tiny_model(llm=llm)
    # held, not only their ids: qlora replaces the LLM's linear weights, and a freed tensor's id can be reused by
    # a new LoRA parameter (which made the disjointness check below fail by chance)
    original_params = list(model.llm.parameters())
    original = {id(p) for p in original_params}
    report = apply_tuning(model, {"name": tuner}, tune=ONLY_LLM)
    assert report["tuner"] == model.applied_tuner == tuner
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert report["trainable_llm"] == report["trainable_total"] == sum(p.numel() for p in trainable)
    assert {id(p) for p in trainable} <= {id(p) for p in model.llm.parameters()}  # the LLM only
    if tuner == "full":
        assert {id(p) for p in trainable} == original
    else:
        assert not {id(p) for p in trainable} & original  # the tuner's own parameters, none of the LLM's weights
    assert (report["trainable_llm"] > 0) == (tuner != "frozen")
    assert report["total"] == count_parameters(model)


@pytest.mark.parametrize("tuner", TUNERS)
def test_tp_on_meta_for_llava_3b_is_the_documented_number(tuner):
    assert count(["model=llava_3b", f"tuner={tuner}"])["trainable_llm"] == documented_tp(tuner)


def _train(model, batch, steps=2, lr=1e-2):
    ids, mask, pixels, labels = batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr) if params else None
    for _ in range(steps if params else 0):
        model(ids, mask, pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("tuner", TUNERS)
def test_save_load_identical_logits_and_cached_generation(tuner):
    torch.manual_seed(1)
    model = tiny_model(llm="llama")
    apply_tuning(model, {"name": tuner}, tune=ONLY_LLM)
    batch = make_batch(model)
    _train(model, batch)
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    model.eval()
    with torch.no_grad():
        expected = model(*batch[:3]).logits

    torch.manual_seed(123)  # another initialisation of the tuner's weights: loading must overwrite every one
    fresh = tiny_model(llm="llama")
    apply_tuning(fresh, {"name": tuner}, tune=ONLY_LLM)
    fresh.eval()
    with torch.no_grad():
        if tuner != "frozen":
            assert not torch.equal(fresh(*batch[:3]).logits, expected)  # the check below can fail
        fresh.load_trainable_state_dict(state)
        assert torch.equal(fresh(*batch[:3]).logits, expected)

    ids, mask, pixels, _ = batch
    ids, mask = ids[:, :30], mask[:, :30]  # both samples keep their image span; sample 1 is left-padded
    with torch.no_grad(), deprecations_are_errors():
        cached = fresh.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=-1)
        assert cached == greedy_without_cache(fresh, ids, mask, pixels, 5)
