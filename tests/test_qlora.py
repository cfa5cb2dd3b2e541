"""tuner=qlora: PEFT LoRA on a 4-bit NF4 base through bitsandbytes, trained on CPU (bitsandbytes ≥ 0.48 runs 4-bit
forward and backward there).

* the config: the paper's LoRA settings plus the quantization keys, checked like every tuner's options;
* a clear error where bitsandbytes cannot be imported;
* every decoder-layer linear is a frozen 4-bit layer under a LoRA wrapper, embeddings and lm_head untouched;
* training steps: the loss falls and only the LoRA and connector weights change (the 4-bit base stays bit for bit);
* the real training loop (factory.train.run) trains and saves it; the checkpoint holds only LoRA + connector
  weights, and load_checkpoint (which quantizes the same base weights again) gives identical logits;
* TP* on the meta device equals LoRA's (tests/test_params.py checks the three sizes).
"""
import sys

import pytest
import torch

import factory
from factory import checkpoint as ckpt
from factory.errors import FactoryError
from factory.testing import tiny_model
from factory.tuners import apply_tuning, validate_tuner_options
from test_mores import make_batch  # not tests.test_mores: an installed package may own the name `tests`
from test_tuners import _train
from train_support import make_small_world, read_metrics, train_cfg

bnb = pytest.importorskip("bitsandbytes")  # in requirements.txt; a machine without it still checks the error below

STAGE2 = {"vision": "frozen", "connector": "full", "llm": "tuner"}


def quantized_layers(model):
    return [m for m in model.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_the_preset_is_the_papers_lora_on_nf4():
    from factory.config import compose

    cfg = compose(["tuner=qlora"]).tuner
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules) == (128, 256, 0.05, None)
    assert (cfg.quant_type, cfg.double_quant, cfg.compute_dtype, cfg.blocksize) == ("nf4", True, "bf16", 64)


@pytest.mark.parametrize("key,value,words", [("quant_type", "nf5", "nf4"), ("compute_dtype", "int8", "bf16"),
                                             ("blocksize", 100, "64"), ("r", 0, "r")])
def test_bad_options_are_one_error_naming_the_key(key, value, words):
    with pytest.raises(FactoryError, match=f"tuner.{key}") as err:
        validate_tuner_options({"name": "qlora", key: value})
    assert words in str(err.value) and "configs/tuner/qlora.yaml" in str(err.value)


def test_without_bitsandbytes_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(FactoryError) as err:
        apply_tuning(tiny_model(llm="llama"), {"name": "qlora"}, tune=STAGE2)
    message = str(err.value)
    assert "tuner=qlora needs bitsandbytes" in message and "pip install" in message and "tuner=lora" in message


@pytest.mark.parametrize("llm", ["phi", "llama"])
def test_every_decoder_linear_is_4bit_under_lora(llm):
    model = tiny_model(llm=llm)
    layers = model.llm.config.num_hidden_layers
    apply_tuning(model, {"name": "qlora", "r": 4, "alpha": 8}, tune=STAGE2)
    quantized = quantized_layers(model)
    per_layer = 6 if llm == "phi" else 7  # phi: q k v dense fc1 fc2; llama: q k v o gate up down
    assert len({id(m.weight) for m in quantized}) == layers * per_layer
    for module in quantized:
        assert module.weight.dtype == torch.uint8 and module.weight.quant_state.quant_type == "nf4"
        assert not module.weight.requires_grad
    base = model.llm.get_base_model()
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.llm.named_parameters())


def test_training_steps_lower_the_loss_and_train_only_lora_and_the_connector():
    torch.manual_seed(0)
    model = tiny_model(llm="llama")
    apply_tuning(model, {"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0}, tune=STAGE2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids, mask, pixels, labels = make_batch(model)
    losses = _train(model, (ids, mask, pixels, labels), steps=8, lr=3e-3)
    assert losses[-1] < losses[0] - 0.3, losses
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    trainable = set(model.trainable_state_dict())
    assert changed and changed <= trainable
    assert all(k.startswith("connector.") or "lora_" in k for k in trainable)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert any(k.startswith("connector.") for k in changed)


def test_the_training_loop_saves_lora_and_connector_only_and_reloads_identically(tmp_path):
    """factory.train.run, both stages (the tiny random model; stage 2 with qlora): the instruct checkpoint, rebuilt
    by load_checkpoint (the base quantized again), gives the logits of the trained weights in the folder."""
    from factory.train import run
    from factory.train.recipe import build_stage_model
    from factory.stages import plan_stages

    world = make_small_world(tmp_path / "world")
    cfg = train_cfg(tmp_path / "run", world, tuner="qlora",
                    **{"trainer.max_steps": 6, "tuner.r": 8, "tuner.alpha": 16})
    run(cfg)
    instruct = [r for r in read_metrics(tmp_path / "run") if r["stage"] == "instruct"]
    assert len(instruct) == 6 and all(r["loss"] == r["loss"] > 0 for r in instruct)
    assert instruct[-1]["loss"] < instruct[0]["loss"]

    folder = tmp_path / "run" / "instruct"
    saved = ckpt.load_weights_file(folder)
    assert saved and all(k.startswith("connector.") or "lora_" in k for k in saved)
    assert any("lora_" in k for k in saved) and any(k.startswith("connector.") for k in saved)

    loaded = factory.load_checkpoint(folder)
    assert quantized_layers(loaded)
    assert set(loaded.trainable_state_dict()) == set(saved)
    # the same model built by hand: fresh base, quantized, the saved weights loaded
    by_hand = build_stage_model(cfg, plan_stages(cfg)[1], None, torch.float32)
    by_hand.load_trainable_state_dict(saved)
    ids, mask, pixels, _ = make_batch(loaded)
    with torch.no_grad():
        expected = by_hand.eval()(ids, mask, pixels).logits
        assert torch.equal(loaded(ids, mask, pixels).logits, expected)
        assert torch.equal(factory.load_checkpoint(folder)(ids, mask, pixels).logits, expected)


def test_it_cannot_be_merged():
    model = tiny_model(llm="llama")
    apply_tuning(model, {"name": "qlora", "r": 4, "alpha": 8}, tune=STAGE2)
    with pytest.raises(FactoryError, match="cannot be merged"):
        factory.tuners.merge_for_export(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by scripts/gpu_check.sh)")
def test_qlora_trains_on_cuda_and_reloads_identically():
    """The GPU path: quantized on the GPU (bitsandbytes' CUDA kernels), bf16 compute, a few AdamW steps lower the
    loss, and the LoRA + connector weights loaded into a fresh quantized model give the same logits."""
    def build(seed):
        model = tiny_model(llm="llama", seed=0).cuda()
        torch.manual_seed(seed)  # the LoRA init: the fresh model starts elsewhere, loading must overwrite it
        apply_tuning(model, {"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0}, tune=STAGE2)
        return model

    model = build(1)
    assert quantized_layers(model) and all(m.weight.device.type == "cuda" for m in quantized_layers(model))
    ids, mask, pixels, labels = (t.cuda() for t in make_batch(model))
    losses = _train(model, (ids, mask, pixels, labels), steps=8, lr=3e-3)
    assert losses[-1] < losses[0] - 0.3, losses
    fresh = build(2)
    fresh.load_trainable_state_dict({k: v.clone() for k, v in model.trainable_state_dict().items()})
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids, mask, pixels).logits, model.eval()(ids, mask, pixels).logits)
