"""Strict loading: a component folder whose weights do not cover the module is refused with the folder and the first
offending keys (transformers alone only warns and leaves random weights); a matching folder loads; a checkpoint's
weights file with a tensor missing or extra is refused."""
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                          LlavaConfig, LlavaForConditionalGeneration)

import factory
from factory import checkpoint as ckpt
from factory.errors import FactoryError
from factory.model.build import build_model
from factory.registry import VISION_ENCODERS
from factory.testing import tiny_config, tiny_tokenizer_dir

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4)


def vision_cfg(path, **extra):
    return OmegaConf.create({"name": "hf_clip", "path": str(path), "select_layer": -2, "image_size": 32, **extra})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("strict")
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    tower.save_pretrained(root / "clip_vision")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    whole = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text))
    whole.save_pretrained(root / "clip_whole")
    LlavaForConditionalGeneration(LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                                              image_token_index=511)).save_pretrained(root / "llava")
    LlamaForCausalLM(LlamaConfig(**TEXT)).save_pretrained(root / "llama")
    return root, {"clip_vision": tower.state_dict(), "clip_whole": {
        k: v for k, v in whole.vision_model.state_dict().items()}}


def test_a_whole_llava_folder_as_vision_path_is_refused(folders):
    """The issue's case: a llava-hf checkpoint given as vision.path loaded 0 of the tower's tensors silently."""
    root, _ = folders
    with pytest.raises(FactoryError) as err:
        VISION_ENCODERS.get("hf_clip")(vision_cfg(root / "llava"), init="pretrained", dtype=torch.float32)
    message = str(err.value)
    assert f"`vision.path` = {str(root / 'llava')!r} do not fit the vision encoder" in message
    assert "missing 39 (embeddings.class_embedding, embeddings.patch_embedding.weight" in message
    assert "unexpected" in message and "stage.init_from=hf:<folder>" in message


def test_matching_folders_load_exactly(folders):
    root, expected = folders
    for name in ("clip_vision", "clip_whole"):  # a whole CLIP checkpoint: its text tower is listed as unused
        encoder = VISION_ENCODERS.get("hf_clip")(vision_cfg(root / name), init="pretrained", dtype=torch.float32)
        assert set(encoder.model.state_dict()) == set(expected[name])
        for key, value in expected[name].items():
            assert torch.equal(encoder.model.state_dict()[key], value), (name, key)


def test_an_llm_folder_with_a_missing_tensor_is_refused(folders, tmp_path):
    root, _ = folders
    broken = tmp_path / "llama"
    broken.mkdir()
    for file in (root / "llama").iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(str(broken / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    cfg = tiny_config(llm="llama")
    cfg.init = "pretrained"
    cfg.llm.path = str(broken)
    cfg.vision.path = str(root / "clip_vision")
    with pytest.raises(FactoryError, match=r"`llm.path` = .* do not fit the LLM: missing 1 "
                                           r"\(model.layers.1.mlp.up_proj.weight\)"):
        build_model(cfg)
    cfg.llm.path = str(root / "llama")
    model = build_model(cfg)  # the intact folder loads
    assert model.llm.model.layers[1].mlp.up_proj.weight.abs().sum() > 0
    assert str(tiny_tokenizer_dir()) == cfg.llm.tokenizer


class _PlainEngine:
    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self):
        return 0


def test_a_checkpoint_with_a_missing_or_extra_tensor_is_refused(tmp_path):
    from factory.stages import plan_stages
    from factory.train.recipe import build_stage_model
    from train_support import train_cfg

    cfg = train_cfg(tmp_path / "run", tmp_path / "unused", tuner="lora", stage="all")
    model = build_stage_model(cfg, plan_stages(cfg)[1], None, torch.float32)
    meta = {"stage": "instruct", "template": "phi", "tune": plan_stages(cfg)[1].tune, "seed": int(cfg.seed),
            "complete": True, "step": 1, "total_steps": 1}
    folder = ckpt.save_stage_checkpoint(_PlainEngine(model), cfg, tmp_path / "run" / "instruct", meta, rank=0,
                                        with_engine_state=False)
    factory.load_checkpoint(folder)  # intact: loads
    weights = load_file(str(folder / ckpt.WEIGHTS_FILE))
    name = sorted(k for k in weights if "lora_A" in k)[0]
    save_file({k: v for k, v in weights.items() if k != name}, str(folder / ckpt.WEIGHTS_FILE))
    with pytest.raises(FactoryError, match=rf"trainable\.safetensors does not fit the model.*missing: {name}"):
        factory.load_checkpoint(folder)
    save_file({**weights, "llm.extra.weight": torch.zeros(2)}, str(folder / ckpt.WEIGHTS_FILE))
    with pytest.raises(FactoryError, match=r"missing: none; unexpected: llm\.extra\.weight"):
        factory.load_checkpoint(folder)
