"""build_model: exact meta-device sizes of the presets, component registries, encoders, tokenizers, errors."""
import shutil
import time

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from factory.config import CONFIG_DIR, compose
from factory.errors import FactoryError
from factory.model import LlavaModel, build_model
from factory.model.llms import decoder_layers, load_tokenizer
from factory.registry import CONNECTORS, LLMS, VISION_ENCODERS
from factory.testing import tiny_config, tiny_model, tiny_tokenizer

PHI2 = 2_779_683_840
LLAMA2_7B = 6_738_415_616
VICUNA_13B = 13_015_864_320
SIGLIP_SO400M_384 = 428_225_600  # includes the attention-pooling head, as the published count does
CLIP_L336 = 303_507_456


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def model_configs(tmp_path_factory):
    """A root config with only the model groups, so these tests do not depend on the other groups."""
    root = tmp_path_factory.mktemp("configs")
    for group in ("model", "vision", "connector", "llm"):
        shutil.copytree(CONFIG_DIR / group, root / group)
    (root / "train.yaml").write_text(
        "defaults:\n  - vision: clip_l336\n  - connector: mlp2x_gelu\n  - llm: phi2\n  - model: llava_3b\n"
        "  - _self_\ninit: pretrained\n"
    )
    return root


@pytest.mark.parametrize("preset, vision, llm, tokens, width", [
    ("llava_3b", SIGLIP_SO400M_384, PHI2, 729, 2560),
    ("llava_7b", CLIP_L336, LLAMA2_7B, 576, 4096),
    ("llava_13b", CLIP_L336, VICUNA_13B, 576, 5120),
])
def test_meta_build_has_exact_sizes(model_configs, preset, vision, llm, tokens, width):
    start = time.perf_counter()
    model = build_model(compose([f"model={preset}", "init=meta"], config_dir=model_configs))
    assert time.perf_counter() - start < 30
    assert isinstance(model, LlavaModel)
    assert count(model.vision) == vision
    assert count(model.llm) == llm
    dv = model.vision.hidden_size
    assert count(model.connector) == dv * width + width + width * width + width  # mlp2x_gelu
    assert count(model) == vision + llm + count(model.connector)
    assert model.image_token_count == tokens == model.vision.num_tokens
    assert next(model.llm.parameters()).device.type == "meta"
    assert model.config["model"]["name"] == preset


def test_registries_list_their_names():
    assert {"hf_clip", "hf_siglip", "open_clip", "timm"} <= set(VISION_ENCODERS.names())
    assert {"linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu", "mlp4x_gelu", "identity"} <= set(CONNECTORS.names())
    assert {"phi", "llama", "vicuna", "hf_causal_lm"} <= set(LLMS.names())


@pytest.mark.parametrize("section", ["vision", "connector", "llm"])
def test_unknown_component_lists_registered_names(section):
    cfg = tiny_config()
    cfg[section].name = "no_such_thing"
    with pytest.raises(FactoryError) as err:
        build_model(cfg)
    registry = {"vision": VISION_ENCODERS, "connector": CONNECTORS, "llm": LLMS}[section]
    for name in registry.names():
        assert name in str(err.value)


def test_bad_init_and_unknown_arch_are_factory_errors():
    cfg = tiny_config()
    cfg.init = "warm"
    with pytest.raises(FactoryError, match="init"):
        build_model(cfg)
    cfg = tiny_config()
    cfg.llm.arch = "phi-9000"
    with pytest.raises(FactoryError, match="phi-9000.*tiny-phi"):
        build_model(cfg)


def test_connectors():
    mlp3 = CONNECTORS.get("mlp3x_gelu")(None, 8, 16)
    assert [type(m).__name__ for m in mlp3] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert (mlp3[0].in_features, mlp3[0].out_features, mlp3[4].in_features) == (8, 16, 16)
    assert CONNECTORS.get("linear")(None, 8, 16)(torch.zeros(2, 8)).shape == (2, 16)
    model = tiny_model(connector="identity")  # vision and LLM are both 64 wide
    assert count(model.connector) == 0
    with pytest.raises(FactoryError, match="identity.*48.*64"):
        tiny_model(connector="identity", vision_hidden=48)


@pytest.mark.parametrize("vision, drop", [("hf_clip", 1), ("hf_siglip", 0)])
@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_hf_encoder_matches_hidden_states(vision, drop, select_layer):
    cfg = tiny_config(vision=vision, layers=3)
    cfg.vision.select_layer = select_layer
    encoder = build_model(cfg).vision.eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = encoder.model(pixels, output_hidden_states=True).hidden_states[select_layer][:, drop:]
    got = encoder.encode(pixels)
    assert got.shape == (2, 16, 64) and encoder.num_tokens == 16
    torch.testing.assert_close(got, expected)


def test_encoder_skips_blocks_after_select_layer_and_pooling_head():
    encoder = tiny_model(vision="hf_siglip", layers=3).vision
    tower = getattr(encoder.model, "vision_model", encoder.model)
    calls = []
    tower.encoder.layers[-1].register_forward_hook(lambda *a: calls.append("last block"))
    tower.head.register_forward_hook(lambda *a: calls.append("head"))
    tower.encoder.layers[1].register_forward_hook(lambda *a: calls.append("selected block"))
    encoder.encode(torch.randn(1, 3, 32, 32))
    assert calls == ["selected block"]
    with pytest.raises(FactoryError, match="select_layer"):
        cfg = tiny_config()
        cfg.vision.select_layer = -5
        build_model(cfg)


def test_image_transform_pad_and_resize():
    encoder = tiny_model().vision
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    padded = encoder.image_transform(image)
    assert padded.shape == (3, 32, 32)
    # the top rows are padding in the mean colour → ≈ 0 after normalisation; the middle is red
    assert padded[:, 0, :].abs().max() < 0.02
    red = (1.0 - encoder.image_mean[0]) / encoder.image_std[0]
    assert abs(float(padded[0, 16, 16]) - red) < 1e-4
    encoder.image_aspect = "resize"
    resized = encoder.image_transform(image)
    assert abs(float(resized[0, 0, 0]) - red) < 1e-4


def vision_variant(init, **vision):
    cfg = tiny_config()
    cfg.init = init
    cfg.vision = OmegaConf.create({"select_layer": -2, "image_aspect": "pad", "arch_overrides": None, **vision})
    return cfg


def test_open_clip_and_timm_meta_builds():
    model = build_model(vision_variant("meta", name="open_clip", arch="ViT-B-16", path="openai"))
    assert (model.vision.num_tokens, model.vision.hidden_size, model.vision.image_size) == (196, 768, 224)
    assert count(model.vision) == 86_192_640  # open_clip ViT-B-16 image tower (with its 768→512 projection)
    model = build_model(vision_variant("meta", name="timm", arch="vit_base_patch16_224", path=None))
    assert count(model.vision) == 85_798_656  # ViT-B/16 without its classifier head
    assert (model.vision.num_tokens, model.vision.hidden_size, model.vision.image_size) == (196, 768, 224)


def test_timm_tiny_encoder_features():
    cfg = vision_variant("random", name="timm", arch="vit_base_patch16_224", path=None, arch_overrides={
        "img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 4})
    encoder = build_model(cfg).vision.eval()
    pixels = torch.randn(2, 3, 32, 32)
    vit = encoder.model
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(pixels)))
    for block in vit.blocks[:2]:
        x = block(x)
    torch.testing.assert_close(encoder.encode(pixels), x[:, vit.num_prefix_tokens:])


def test_tokenizer_pad_policy(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    node = {"tokenizer": str(tmp_path)}
    assert load_tokenizer(node, "random", pad_with_unk=True).pad_token == "<unk>"  # llama / vicuna
    assert load_tokenizer(node, "random", pad_with_unk=False).pad_token == "</s>"  # phi / generic: eos
    assert tiny_model(llm="llama").tokenizer.pad_token == "<pad>"  # an existing pad token is kept


def test_missing_tokenizer_allowed_only_for_meta():
    cfg = tiny_config()
    cfg.llm.tokenizer = None
    cfg.init = "meta"
    assert build_model(cfg).tokenizer is None
    cfg.init = "random"
    with pytest.raises(FactoryError, match="tokenizer"):
        build_model(cfg)


def test_decoder_layers_plain_and_peft():
    from peft import LoraConfig, get_peft_model

    for llm in ("phi", "llama"):
        model = tiny_model(llm=llm, layers=3)
        layers = decoder_layers(model.llm)
        assert len(layers) == 3 and isinstance(layers, torch.nn.ModuleList)
        wrapped = get_peft_model(model.llm, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        assert decoder_layers(wrapped) is layers


def test_tiny_model_and_tokenizer(tmp_path):
    tiny_model()  # warm the imports
    start = time.perf_counter()
    model = tiny_model(llm="llama", vision="hf_siglip", seed=3)
    assert time.perf_counter() - start < 1.0
    assert model.template == "vicuna_v1" and tiny_model().template == "phi"
    assert torch.equal(next(model.connector.parameters()),
                       next(tiny_model(llm="llama", vision="hf_siglip", seed=3).connector.parameters()))
    tokenizer = tiny_tokenizer(tmp_path)
    assert len(tokenizer) <= 512
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "A chat between a curious user and an artificial intelligence assistant. USER: hi ASSISTANT: yes"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert len(tokenizer(text).input_ids) < 30  # template words are single tokens
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert (loaded.eos_token, loaded.pad_token, loaded.unk_token, loaded.bos_token) == ("</s>", "<pad>", "<unk>", "<s>")


def test_configured_image_size_must_match_the_model():
    cfg = tiny_config()
    cfg.vision.image_size = 64
    with pytest.raises(FactoryError, match="image_size.*64.*32"):
        build_model(cfg)


@pytest.mark.parametrize("llm, vision", [("phi", "hf_clip"), ("llama", "hf_siglip")])
def test_pretrained_from_local_folders_reproduces_the_model(tmp_path, llm, vision):
    source = tiny_model(llm=llm, vision=vision, seed=5).eval()
    source.vision.model.save_pretrained(tmp_path / "vision")
    source.llm.save_pretrained(tmp_path / "llm")
    source.tokenizer.save_pretrained(tmp_path / "llm")
    cfg = tiny_config(llm=llm, vision=vision)
    cfg.init = "pretrained"
    cfg.vision.path, cfg.llm.path, cfg.llm.tokenizer = str(tmp_path / "vision"), str(tmp_path / "llm"), None
    loaded = build_model(cfg).eval()
    loaded.connector.load_state_dict(source.connector.state_dict())
    ids = torch.tensor([[5, 6] + [-200] * 16 + [7]])
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(ids, None, pixels).logits, source(ids, None, pixels).logits)
    cfg.vision.path = str(tmp_path / "missing")
    with pytest.raises(FactoryError, match="vision.path"):
        build_model(cfg)


@pytest.mark.parametrize("key", ["llm.path", "vision.path"])
def test_missing_pretrained_model_is_a_clear_error(tmp_path, key):
    """A path with no model behind it names the config key and the path, never a hub-client trace."""
    from factory.config import compose
    from factory.model import build_model

    missing = tmp_path / "no_such_model"
    cfg = compose(["model=tiny", f"{key}={missing}"])
    with pytest.raises(FactoryError) as info:
        build_model(cfg)
    message = str(info.value)
    assert f"`{key}`" in message and str(missing) in message
