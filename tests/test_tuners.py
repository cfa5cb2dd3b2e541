"""apply_tuning semantics, per-tuner parameter counts on tiny models, save/load exactness, loss falls, LoRA merge."""
import pytest
import torch

from factory.errors import FactoryError
from factory.testing import tiny_model
from factory.tuners import apply_tuning, count_parameters, merge_for_export, stage_presets
from test_mores import make_batch  # not tests.test_mores: an installed package may own the name `tests`

D, F, L = 64, 256, 2  # tiny_model: hidden 64, FFN 4·64, 2 layers
SMALL = {  # the paper's tuners, shrunk to tiny-model sizes
    "frozen": {"name": "frozen"},
    "full": {"name": "full"},
    "mores": {"name": "mores", "rank": 1, "dropout": 0.0},
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "ia3": {"name": "ia3"},
    "oft": {"name": "oft", "blocks": 4},
    "adapter": {"name": "adapter", "bottleneck": 8},
}
ONLY_LLM = {"vision": "frozen", "connector": "frozen", "llm": "tuner"}


def expected_tp(tuner, llm):
    mlp = [(D, F), (F, D)] if llm == "phi" else [(D, F), (D, F), (F, D)]
    attn = [(D, D)] * 4
    if tuner == "mores":
        return L * (2 * D + 1)
    if tuner == "lora":
        return L * sum(4 * (i + o) for i, o in attn + mlp)
    if tuner == "ia3":
        return L * (D + D + F)  # k, v outputs + the down projection's input
    if tuner == "oft":
        block = D // 4
        return L * 3 * 4 * block * (block - 1) // 2  # peft ≥ 0.16 stores the skew-symmetric half
    if tuner == "adapter":
        return L * (len(mlp)) * 2 * D * 8
    return None


@pytest.mark.parametrize("llm", ["phi", "llama"])
@pytest.mark.parametrize("tuner", ["mores", "lora", "ia3", "oft", "adapter"])
def test_trainable_counts_and_only_tuner_parameters(llm, tuner):
    model = tiny_model(llm=llm)
    llm_total = count_parameters(model.llm)
    report = apply_tuning(model, SMALL[tuner])
    assert report["trainable_llm"] == expected_tp(tuner, llm)
    assert report["trainable_connector"] == count_parameters(model.connector) > 0
    assert report["trainable_vision"] == 0
    assert report["trainable_total"] == report["trainable_llm"] + report["trainable_connector"]
    assert report["total"] == count_parameters(model) == llm_total + report["trainable_llm"] + \
        count_parameters(model.connector) + count_parameters(model.vision)
    assert model.applied_tuner == tuner


def test_ia3_and_adapter_targets_follow_the_architecture():
    model = tiny_model(llm="llama")
    apply_tuning(model, SMALL["ia3"])
    names = {n.split(".ia3_l")[0].rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad
             and "ia3_l" in n}
    assert names == {"k_proj", "v_proj", "down_proj"}
    model = tiny_model(llm="phi")
    apply_tuning(model, SMALL["adapter"])
    sites = {n.split(".adapter.")[0].rsplit(".", 1)[1] for n, p in model.named_parameters() if ".adapter." in n}
    assert sites == {"fc1", "fc2"}
    up = [p for n, p in model.named_parameters() if n.endswith("adapter.up.weight")]
    assert up and all(float(p.detach().abs().sum()) == 0 for p in up)  # zero-init: the model is unchanged at step 0


def test_frozen_full_and_stage_presets():
    model = tiny_model()
    report = apply_tuning(model, SMALL["mores"], tune=stage_presets()["pretrain"])
    assert report["trainable_llm"] == 0 and report["trainable_vision"] == 0
    assert report["trainable_total"] == report["trainable_connector"] == count_parameters(model.connector)
    assert not hasattr(model.llm, "mores")  # stage 1 does not attach the tuner yet
    report = apply_tuning(model, SMALL["mores"], tune=stage_presets()["instruct"])
    assert report["trainable_llm"] == L * (2 * D + 1)
    ids, mask, pixels, _ = make_batch(model)
    model.eval()
    with torch.no_grad():
        first = model(ids, mask, pixels).logits
        again = apply_tuning(model, SMALL["mores"])  # idempotent: no second set of interventions or hooks
        assert again["trainable_llm"] == report["trainable_llm"]
        assert torch.equal(model(ids, mask, pixels).logits, first)
    with pytest.raises(FactoryError):
        apply_tuning(model, SMALL["lora"])  # another tuner on the same model

    model = tiny_model()
    report = apply_tuning(model, SMALL["full"])
    assert report["trainable_llm"] == count_parameters(model.llm)
    report = apply_tuning(model, SMALL["frozen"], tune={"vision": "full", "connector": "frozen", "llm": "frozen"})
    assert report["trainable_llm"] == 0 and report["trainable_connector"] == 0
    assert report["trainable_vision"] == count_parameters(model.vision)

    model = tiny_model()
    vision_before = count_parameters(model.vision)
    report = apply_tuning(model, SMALL["frozen"], tune={"vision": "lora", "connector": "full", "llm": "frozen"})
    trainable = [n for n, p in model.vision.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert report["trainable_vision"] == count_parameters(model.vision) - vision_before


@pytest.mark.parametrize("bad", [{"vision": "lora", "connector": "tuner", "llm": "frozen"},
                                 {"vision": "frozen", "connector": "full"},
                                 {"vision": "frozen", "connector": "full", "llm": "mores"}])
def test_bad_tune_and_tuner_names(bad):
    with pytest.raises(FactoryError):
        apply_tuning(tiny_model(), SMALL["mores"], tune=bad)


def test_unknown_tuner_and_keys():
    with pytest.raises(FactoryError, match="Registered tuners"):
        apply_tuning(tiny_model(), {"name": "loraa"})
    with pytest.raises(FactoryError, match="unknown key"):
        apply_tuning(tiny_model(), {"name": "lora", "rank": 8})


def _train(model, batch, steps, lr):
    ids, mask, pixels, labels = batch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(ids, mask, pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("tuner", ["full", "mores", "lora", "ia3", "oft", "adapter"])
def test_save_load_reproduces_logits_exactly(tuner):
    torch.manual_seed(1)
    model = tiny_model(llm="llama")
    apply_tuning(model, SMALL[tuner])
    batch = make_batch(model)
    _train(model, batch, steps=2, lr=1e-2)
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    model.eval()
    with torch.no_grad():
        expected = model(*batch[:3]).logits
    torch.manual_seed(123)  # the fresh tuner weights differ; loading must overwrite all of them
    fresh = tiny_model(llm="llama")
    apply_tuning(fresh, SMALL[tuner])
    fresh.load_trainable_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(*batch[:3]).logits, expected)


# MoReS steers 9 image tokens of a random 2-layer model, so its loss moves least (~0.06 here); the thresholds are
# about half of the drop measured after 8 steps, far above the noise of a model whose tuner gets no gradient (0).
@pytest.mark.parametrize("tuner,lr,drop", [("frozen", 1e-2, 0.1), ("full", 1e-3, 0.5), ("mores", 1e-1, 0.03), ("lora", 1e-2, 0.3),
                                           ("ia3", 5e-2, 0.08), ("oft", 1e-2, 0.04), ("adapter", 1e-2, 0.1)])
def test_loss_falls_training_only_the_tuner(tuner, lr, drop):
    torch.manual_seed(0)
    model = tiny_model(llm="phi")
    # connector frozen: only the tuner can lower the loss (with tuner=frozen only the connector trains)
    apply_tuning(model, SMALL[tuner], tune=stage_presets()["instruct"] if tuner == "frozen" else ONLY_LLM)
    losses = _train(model, make_batch(model, seed=3), steps=8, lr=lr)
    assert losses[-1] < losses[0] - drop, losses


def test_lora_merge_for_export():
    torch.manual_seed(0)
    model = tiny_model(llm="phi")
    apply_tuning(model, SMALL["lora"])
    batch = make_batch(model)
    _train(model, batch, steps=2, lr=1e-2)
    model.eval()
    with torch.no_grad():
        before = model(*batch[:3]).logits
        merge_for_export(model)
        assert not hasattr(model.llm, "peft_config")
        assert torch.allclose(model(*batch[:3]).logits, before, atol=1e-4)
    with pytest.raises(FactoryError):
        merge_for_export(model)
    other = tiny_model()
    apply_tuning(other, SMALL["mores"])
    with pytest.raises(FactoryError, match="cannot be merged"):
        merge_for_export(other)


def test_stage_plan_accepts_exactly_the_tune_types_apply_tuning_supports():
    """`stage.<stage>.tune` from YAML is validated by the same table as apply_tuning: vision=lora is a valid plan,
    connector=tuner is not, and a left-out component is frozen."""
    from omegaconf import OmegaConf

    from factory.stages import tune_for_stage

    cfg = OmegaConf.create({"stage": {"instruct": {"tune": {"vision": "lora", "connector": "full", "llm": "tuner"}},
                                      "pretrain": {"tune": {"connector": "full"}}}})
    assert tune_for_stage(cfg, "instruct") == {"vision": "lora", "connector": "full", "llm": "tuner"}
    assert tune_for_stage(cfg, "pretrain") == {"vision": "frozen", "connector": "full", "llm": "frozen"}
    cfg.stage.instruct.tune.connector = "tuner"
    with pytest.raises(FactoryError, match=r"stage\.instruct\.tune\.connector='tuner'"):
        tune_for_stage(cfg, "instruct")


def test_stage_presets_equal_the_stage_yaml():
    """The presets apply_tuning defaults to are read from configs/stage/all.yaml and equal what a composed run uses."""
    from factory.config import compose
    from factory.stages import tune_for_stage

    cfg = compose(["stage=all"])
    assert {stage: tune_for_stage(cfg, stage) for stage in ("pretrain", "instruct")} == stage_presets()


@pytest.mark.parametrize("cfg,message", [
    ({"name": "mores", "rank": "abc"}, "tuner.rank='abc' is not valid for the 'mores' tuner: it must be an integer"),
    ({"name": "mores", "rank": True}, "tuner.rank=True is not valid"),
    ({"name": "mores", "rank": 0}, "tuner.rank=0 is not valid for the 'mores' tuner: it must be >= 1"),
    ({"name": "mores", "modality": "audio"}, "it must be one of vision, text"),
    ({"name": "lora", "rnak": 2}, r"unknown key\(s\) \['rnak'\]. Accepted keys: r, alpha, dropout, target_modules"),
    ({"name": "lora", "target_modules": 5}, "it must be a string or a list of strings or null"),
    ({"name": "oft", "coft": "yes"}, "tuner.coft='yes' is not valid for the 'oft' tuner: it must be true or false"),
    ({"name": "adapter", "dropout": 1.0}, "tuner.dropout=1.0 .* it must be >= 0 and < 1"),
    ({"name": "frozen", "rank": 1}, r"unknown key\(s\) \['rank'\]. Accepted keys: \(none\)"),
    ({"name": "lora", "vision_lora": {"r": "x"}}, "tuner.vision_lora.r='x' is not valid"),
    ({"name": "lora", "vision_lora": {"rank": 2}}, r"tuner.vision_lora has unknown key\(s\) \['rank'\]"),
])
def test_typed_options_reject_bad_values_with_the_key_named(cfg, message):
    from factory.tuners import validate_tuner_options

    with pytest.raises(FactoryError, match=message):
        validate_tuner_options(cfg)


def test_typed_options_parse_to_dataclasses():
    from factory.tuners import validate_tuner_options
    from factory.tuners.mores import MoReSOptions
    from factory.tuners.peft_tuners import LoraOptions

    assert validate_tuner_options({"name": "mores", "rank": 2, "layers": [0, 1]}) == \
        MoReSOptions(rank=2, layers=[0, 1])
    lora = validate_tuner_options({"name": "lora", "alpha": 16, "dropout": 0})
    assert lora == LoraOptions(alpha=16, dropout=0.0) and isinstance(lora.dropout, float)


def test_config_checks_run_the_tuner_options_at_compose_time():
    """train.py's config check reports a bad tuner option before anything is built."""
    from factory.config import compose
    from factory.config_checks import check_config

    with pytest.raises(FactoryError, match="tuner.target_modules=5 is not valid for the 'lora' tuner"):
        check_config(compose(["tuner=lora", "tuner.target_modules=5"]))
    with pytest.raises(FactoryError, match=r"tuner.layers=\['a', 'b'\] .* a string or an integer or a list of integers"):
        check_config(compose(["tuner=mores", "tuner.layers=[a,b]"]))
    check_config(compose(["tuner=mores_h"]))  # a valid one passes
