"""Hydra composition of every model preset and component override (configs/ as `python train.py` sees it)."""
import pytest
from omegaconf import OmegaConf

from factory.config import CONFIG_DIR, compose
from factory.errors import FactoryError
from factory.registry import CONNECTORS, LLMS, VISION_ENCODERS

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_the_paper_presets_exist():
    assert {"llava_3b", "llava_7b", "llava_13b"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(preset):
    text = (CONFIG_DIR / "model" / f"{preset}.yaml").read_text()
    assert text.startswith("# @package _global_")
    cfg = compose([f"model={preset}"])
    assert cfg.model.name == preset
    assert cfg.vision.name in VISION_ENCODERS
    assert cfg.connector.name in CONNECTORS
    assert cfg.llm.name in LLMS
    OmegaConf.to_container(cfg.vision, resolve=True)
    OmegaConf.to_container(cfg.llm, resolve=True)


def test_paper_presets_pick_the_paper_components():
    cfg = compose(["model=llava_3b"])
    assert (cfg.vision.name, cfg.vision.path, cfg.vision.image_aspect) == (
        "hf_siglip", "google/siglip-so400m-patch14-384", "pad")
    assert (cfg.connector.name, cfg.llm.name, cfg.llm.path, cfg.llm.template) == (
        "mlp2x_gelu", "phi", "microsoft/phi-2", "phi")
    for preset, llm in (("llava_7b", "lmsys/vicuna-7b-v1.5"), ("llava_13b", "lmsys/vicuna-13b-v1.5")):
        cfg = compose([f"model={preset}"])
        assert (cfg.vision.name, cfg.vision.path, cfg.vision.select_layer) == (
            "hf_clip", "openai/clip-vit-large-patch14-336", -2)
        assert (cfg.llm.name, cfg.llm.path, cfg.llm.template, cfg.connector.name) == (
            "vicuna", llm, "vicuna_v1", "mlp2x_gelu")


@pytest.mark.parametrize("overrides", [["model=llava_3b", "llm=vicuna_7b"], ["llm=vicuna_7b", "model=llava_3b"]])
def test_command_line_component_wins_over_preset(overrides):
    cfg = compose(overrides)
    assert cfg.model.name == "llava_3b"
    assert cfg.llm.path == "lmsys/vicuna-7b-v1.5"
    assert cfg.vision.name == "hf_siglip"  # the rest of the preset stays


@pytest.mark.parametrize("group, registry", [("vision", VISION_ENCODERS), ("connector", CONNECTORS), ("llm", LLMS)])
def test_every_component_option_composes_over_a_preset(group, registry):
    for option in options(group):
        cfg = compose(["model=llava_7b", f"{group}={option}"])
        expected = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
        assert cfg[group].name == expected.name and cfg[group].get("path") == expected.get("path")
        assert cfg[group].name in registry, f"{group}/{option}.yaml names an unregistered component"
        assert cfg.model.name == "llava_7b"


def test_component_keys_follow_the_contract():
    vision_keys = {"name", "path", "arch", "select_layer", "image_size", "image_aspect"}
    llm_keys = {"name", "path", "arch", "tokenizer", "template", "attn_implementation", "trust_remote_code"}
    for option in options("vision"):
        node = OmegaConf.load(CONFIG_DIR / "vision" / f"{option}.yaml")
        assert vision_keys <= set(node), f"vision/{option}.yaml lacks {vision_keys - set(node)}"
        assert node.image_aspect in ("pad", "resize")
    for option in options("llm"):
        node = OmegaConf.load(CONFIG_DIR / "llm" / f"{option}.yaml")
        assert llm_keys <= set(node), f"llm/{option}.yaml lacks {llm_keys - set(node)}"
        assert node.trust_remote_code is False


def test_dotted_overrides_and_init():
    cfg = compose(["model=llava_13b", "init=meta", "llm.attn_implementation=eager", "vision.select_layer=-1",
                   "connector=linear"])
    assert (cfg.init, cfg.llm.attn_implementation, cfg.vision.select_layer, cfg.connector.name) == (
        "meta", "eager", -1, "linear")


@pytest.mark.parametrize("bad", [["model=llava_99b"], ["llm=gpt5"], ["vision.no_such_key=1"]])
def test_bad_overrides_are_factory_errors(bad):
    with pytest.raises(FactoryError, match="override"):
        compose(bad)


EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_passes_the_checks_and_saves_mid_stage(experiment):
    """`python train.py experiment=X` composes and validates, and each recipe saves resumable checkpoints mid-stage
    (a crash costs minutes): full fine-tuning less often, since each save writes the whole optimizer state."""
    from factory.config_checks import config_problems

    cfg = compose([f"experiment={experiment}", "init=meta"])
    assert config_problems(cfg) == []
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.trainer.save_every >= 1
    if cfg.tuner.name == "full":
        assert cfg.trainer.save_every > compose(["trainer=paper"]).trainer.save_every


@pytest.mark.parametrize("data", options("data"))
def test_the_resolved_config_records_the_image_placement(data):
    """A stage's config.yaml is the resolved config, so `data.image_first` (how prompts were built) is recorded in
    every checkpoint's provenance by each shipped data option."""
    assert isinstance(compose([f"data={data}"]).data.image_first, bool)
