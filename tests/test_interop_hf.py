"""HF Llava in and out (docs/interop.md), on tiny random models of both families (CLIP + Llama, SigLIP + Phi):

* import: a LlavaForConditionalGeneration folder written by transformers (tokenizer with `<image>`, processor, chat
  template) becomes a LlavaModel with the same logits (max |Δ| = 0.0 in fp32, padded batch) and greedy tokens;
  `hf:<dir>` works for load_checkpoint, a stage's start and eval; what cannot be mapped is refused;
* export: `python -m factory.export` writes a folder that transformers loads with no missing or unexpected keys,
  whose processor builds the factory's prompt ids and pixels, and that generates the factory's greedy tokens.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, PhiConfig, SiglipVisionConfig)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

import factory
from factory import checkpoint as ckpt
from factory.constants import IMAGE_TOKEN_INDEX
from factory.data.templates import V1Template, get_template
from factory.errors import FactoryError
from factory.export import export, main as export_main
from factory.interop.hf_llava import WEIGHT_NAMES, to_factory_name, to_hf_name, v1_chat_template
from factory.model.llava import positions_from_mask
from factory.model.vision.base import CLIP_MEAN, CLIP_STD, HALF
from factory.stages import plan_stages
from factory.testing import tiny_config, tiny_tokenizer
from factory.train.recipe import build_stage_model
from train_support import train_cfg

FAMILIES = {"clip_llama": ("llama", "hf_clip"), "siglip_phi": ("phi", "hf_siglip")}
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QUESTIONS = ["What is in the image?", "How many shapes are there? Answer with one word."]


def image(seed, size=(30, 20)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def write_hf_llava(folder, family, strategy="default"):
    """A tiny random llava-hf folder written by transformers alone (what a user downloads)."""
    torch.manual_seed(1)
    if family == "clip_llama":
        vision, mean, std, cls = CLIPVisionConfig(**VISION), CLIP_MEAN, CLIP_STD, 1
        text = LlamaConfig(vocab_size=513, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0)
    else:
        vision, mean, std, cls = SiglipVisionConfig(**VISION), HALF, HALF, 0
        text = PhiConfig(vocab_size=513, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=512,
                         vision_feature_select_strategy=strategy, vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # move the projector and norms away from their trivial init
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    images = LlavaImageProcessorPil(do_pad=True, size={"height": 32, "width": 32}, do_center_crop=False,
                                    image_mean=list(mean), image_std=list(std))
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy=strategy,
                   num_additional_image_tokens=cls, chat_template=v1_chat_template(V1Template.system)
                   ).save_pretrained(folder)
    return model


def prompt_batch(model, images):
    """Left-padded prompts of two lengths (the factory's template) with their images, as generation sees them."""
    template = get_template(model.template)
    rows = [template.encode_prompt([{"from": "human", "value": "<image>\n" + q}], model.tokenizer,
                                   model.image_token_count) for q in QUESTIONS]
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.stack([model.vision.image_transform(i) for i in images])
    return input_ids, mask, pixels


def hf_inputs(input_ids, image_token_id):
    return torch.where(input_ids == IMAGE_TOKEN_INDEX, torch.full_like(input_ids, image_token_id), input_ids)


def compare(ours, hf, images, max_new_tokens=8):
    """(max |Δlogit| over the real tokens of a left-padded batch, our greedy tokens, HF's greedy tokens)."""
    input_ids, mask, pixels = prompt_batch(ours, images)
    hf_ids = hf_inputs(input_ids, hf.config.image_token_id)
    with torch.no_grad():
        a = ours(input_ids, mask, pixels).logits
        b = hf(input_ids=hf_ids, attention_mask=mask, pixel_values=pixels,
               position_ids=positions_from_mask(mask, mask.shape[1])).logits
    vocab = min(a.shape[-1], b.shape[-1])
    delta = (a[..., :vocab] - b[..., :vocab])[mask.bool()].abs().max().item()
    our_tokens = ours.generate(input_ids, mask, pixels, max_new_tokens=max_new_tokens)
    out = hf.generate(input_ids=hf_ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=ours.tokenizer.eos_token_id)
    eos = ours.tokenizer.eos_token_id
    hf_tokens = []
    for row in out[:, input_ids.shape[1]:].tolist():
        hf_tokens.append(row[:row.index(eos)] if eos in row else row)
    return delta, our_tokens, hf_tokens


# ------------------------------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_computes_what_hf_llava_computes(tmp_path, family):
    hf = write_hf_llava(tmp_path / "hf", family)
    model = factory.load_checkpoint(f"hf:{tmp_path / 'hf'}")
    # HF "default" drops the first token: CLIP's CLS, and for SigLIP a patch token (15 of 16)
    assert model.image_token_count == (16 if family == "clip_llama" else 15)
    assert model.template == ("vicuna_v1" if family == "clip_llama" else "phi")
    assert model.vision.image_aspect == "pad" and model.vision.select_layer == -2
    delta, ours, theirs = compare(model, hf, [image(0), image(1, (20, 30))])
    assert delta == 0.0
    assert ours == theirs and all(len(t) > 0 for t in ours)


def test_full_strategy_keeps_every_token(tmp_path):
    hf = write_hf_llava(tmp_path / "hf", "clip_llama", strategy="full")
    model = factory.load_checkpoint(f"hf:{tmp_path / 'hf'}")
    assert model.image_token_count == 17  # 16 patches + CLS
    delta, ours, theirs = compare(model, hf, [image(2), image(3)])
    assert delta == 0.0 and ours == theirs


def test_weight_names_map_one_to_one(tmp_path):
    hf = write_hf_llava(tmp_path / "hf", "clip_llama")
    model = factory.load_checkpoint(f"hf:{tmp_path / 'hf'}")
    ours = model.state_dict()
    theirs = hf.state_dict()
    assert {to_hf_name(n) for n in ours} == set(theirs)
    assert {to_factory_name(n) for n in theirs} == set(ours)
    for name, value in ours.items():
        assert torch.equal(value, theirs[to_hf_name(name)]), name
    assert [p for p, _ in WEIGHT_NAMES] == ["vision.model.", "connector.0.", "connector.2.", "llm.model.", "llm.lm_head."]


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_what_cannot_be_mapped_is_refused(tmp_path):
    folder = tmp_path / "hf"
    write_hf_llava(folder, "clip_llama")
    edit_config(folder, projector_hidden_act="relu")
    with pytest.raises(FactoryError, match=r"projector_hidden_act='relu'.*is not the factory's mlp2x_gelu"):
        factory.load_checkpoint(f"hf:{folder}")
    edit_config(folder, projector_hidden_act="gelu", vision_feature_layer=[-2, -1])
    with pytest.raises(FactoryError, match=r"vision_feature_layer \[-2, -1\] concatenates several layers"):
        factory.load_checkpoint(f"hf:{folder}")
    edit_config(folder, model_type="llava_next")
    with pytest.raises(FactoryError, match=r"describes a 'llava_next' model; `hf:<dir>` imports `llava`"):
        factory.load_checkpoint(f"hf:{folder}")
    with pytest.raises(FactoryError, match=r"hf:.*nope: no such folder"):
        factory.load_checkpoint(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(FactoryError, match=r"neither an existing folder nor `<scheme>:<folder>` with a known scheme"):
        factory.load_checkpoint(f"hg:{folder}")


def test_a_chat_template_no_factory_template_reproduces_is_refused_for_eval(tmp_path):
    folder = tmp_path / "hf"
    write_hf_llava(folder, "clip_llama")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}USER: {{ m['content'][1]['text'] }}"
                                                "{% endfor %} ASSISTANT:")
    with pytest.raises(FactoryError, match=r"no factory template reproduces token for token"):
        factory.load_checkpoint(f"hf:{folder}")
    model = ckpt.import_model(f"hf:{folder}", template="vicuna_v1")  # a stage names its template: accepted
    assert model.template == "vicuna_v1"


def test_a_stage_starts_from_an_hf_folder(tmp_path):
    """stage.init_from=hf:<dir>: the stage's model is the imported one (then tuned); its checkpoint reloads it."""
    hf = write_hf_llava(tmp_path / "hf", "clip_llama")
    cfg = train_cfg(tmp_path / "run", tmp_path / "unused", tuner="lora", stage="instruct",
                    **{"stage.init_from": f"hf:{tmp_path / 'hf'}"})
    spec = plan_stages(cfg)[0]
    model = build_stage_model(cfg, spec, None, torch.float32).eval()
    assert model.image_token_count == 16 and model.template == spec.template
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"connector", "llm"}
    delta, ours, theirs = compare(model, hf, [image(4), image(5)])  # LoRA starts as the identity
    assert delta == 0.0 and ours == theirs
    meta = {"stage": "instruct", "template": spec.template, "tune": spec.tune, "seed": 0, "complete": True,
            "step": 1, "total_steps": 1, "tuner": "lora"}
    folder = ckpt.save_stage_checkpoint(_PlainEngine(model), cfg, tmp_path / "run" / "instruct", meta, rank=0,
                                        with_engine_state=False)
    loaded = factory.load_checkpoint(folder)
    input_ids, mask, pixels = prompt_batch(model, [image(4), image(5)])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, mask, pixels).logits, model(input_ids, mask, pixels).logits)


class _PlainEngine:
    def __init__(self, module):
        self.module = module

    def zero_optimization_stage(self):
        return 0


# ------------------------------------------------------------------------------------------------------------ export
def stage_checkpoint(tmp_path, family, tuner="full", connector="mlp2x_gelu", lm_head_bias=0.0):
    """A saved stage-2 checkpoint of the tiny model of `family`, its trained weights moved away from their init."""
    llm, vision = FAMILIES[family]
    cfg = train_cfg(tmp_path / "run", tmp_path / "unused", tuner=tuner, stage="all")
    tiny = tiny_config(llm=llm, vision=vision, connector=connector)
    cfg.vision, cfg.llm, cfg.connector = tiny.vision, tiny.llm, tiny.connector
    spec = plan_stages(cfg)[1]
    model = build_stage_model(cfg, spec, None, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        head = model.llm.get_output_embeddings()
        if getattr(head, "bias", None) is not None and lm_head_bias:
            head.bias.fill_(lm_head_bias)
            model.llm.get_output_embeddings().bias.requires_grad_(True)
    meta = {"stage": "instruct", "template": spec.template, "tune": spec.tune, "seed": 0, "complete": True,
            "step": 1, "total_steps": 1, "tuner": tuner}
    folder = ckpt.save_stage_checkpoint(_PlainEngine(model), cfg, tmp_path / "run" / "instruct", meta, rank=0,
                                        with_engine_state=False)
    return folder


def load_export(out, backend=None):
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert {k: sorted(v) for k, v in info.items() if k != "error_msgs"} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    return hf.eval(), AutoProcessor.from_pretrained(out, backend=backend)


def processor_inputs(processor, question, img):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=img, text=text, return_tensors="pt")


# Phi's lm_head has a bias that full fine-tuning trains (refused below); frozen keeps the tiny model's zero bias.
@pytest.mark.parametrize("family,tuner", [("clip_llama", "full"), ("siglip_phi", "frozen")])
def test_export_loads_in_transformers_and_generates_the_factory_tokens(tmp_path, family, tuner):
    folder = stage_checkpoint(tmp_path, family, tuner=tuner)
    result = export(str(folder), str(tmp_path / "out"))
    assert result["vision_feature_select_strategy"] == ("default" if family == "clip_llama" else "full")
    ours = factory.load_checkpoint(folder)
    hf, processor = load_export(tmp_path / "out", backend="pil")
    delta, our_tokens, hf_tokens = compare(ours, hf, [image(6), image(7, (20, 30))])
    assert delta == 0.0 and our_tokens == hf_tokens
    # the processor reproduces the factory's prompt ids and pixels exactly
    img = image(8, (30, 20))
    batch = processor_inputs(processor, QUESTIONS[0], img)
    expected = get_template(ours.template).encode_prompt([{"from": "human", "value": "<image>\n" + QUESTIONS[0]}],
                                                         ours.tokenizer, ours.image_token_count)
    got = batch["input_ids"][0].tolist()
    assert [IMAGE_TOKEN_INDEX if t == hf.config.image_token_id else t for t in got] == expected
    assert torch.equal(batch["pixel_values"][0], ours.vision.image_transform(img))
    generated = hf.generate(**batch, max_new_tokens=8)[0, len(got):].tolist()
    factory_tokens = ours.generate(torch.tensor([expected]), pixel_values=ours.vision.image_transform(img)[None],
                                   max_new_tokens=8)[0]
    eos = ours.tokenizer.eos_token_id
    assert (generated[:generated.index(eos)] if eos in generated else generated) == factory_tokens
    # the default (torchvision) processor interpolates differently, yet gives the same greedy answer here
    _, torchvision_processor = load_export(tmp_path / "out")
    batch = processor_inputs(torchvision_processor, QUESTIONS[0], img)
    assert hf.generate(**batch, max_new_tokens=8)[0, len(got):].tolist() == generated


def test_lora_is_merged(tmp_path):
    folder = stage_checkpoint(tmp_path, "clip_llama", tuner="lora")
    result = export(str(folder), str(tmp_path / "out"))
    assert result["merged"] is True
    hf, _ = load_export(tmp_path / "out", backend="pil")
    delta, ours, theirs = compare(factory.load_checkpoint(folder), hf, [image(9), image(10)])
    assert delta < 1e-5 and ours == theirs  # W + BA rounded once into W: fp32 rounding only


def test_mores_writes_tuner_files_beside_the_base(tmp_path):
    folder = stage_checkpoint(tmp_path, "siglip_phi", tuner="mores")
    result = export(str(folder), str(tmp_path / "out"))
    assert sorted(result["tuner_files"]) == ["factory_tuner.json", "factory_tuner.safetensors"]
    hf, _ = load_export(tmp_path / "out", backend="pil")
    # the base alone is the checkpoint without MoReS: the connector is the trained one
    ours = factory.load_checkpoint(folder)
    assert torch.equal(hf.model.multi_modal_projector.linear_1.weight, ours.connector[0].weight)


def test_what_hf_llava_cannot_hold_is_refused(tmp_path):
    folder = stage_checkpoint(tmp_path / "a", "siglip_phi", lm_head_bias=0.25, tuner="full")
    with pytest.raises(FactoryError) as err:
        export(str(folder), str(tmp_path / "out"))
    assert "lm_head has a non-zero bias (max |b| = 0.25" in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    folder = stage_checkpoint(tmp_path / "b", "clip_llama", connector="linear")
    with pytest.raises(FactoryError, match=r"the connector is 'linear', but HF Llava's projector is exactly Linear"):
        export(str(folder), str(tmp_path / "out"))


def test_an_existing_out_folder_is_never_replaced_silently(tmp_path, capsys):
    folder = stage_checkpoint(tmp_path, "clip_llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert export_main([f"checkpoint={folder}", f"out={tmp_path / 'out'}"]) == 2
    assert "already exists; an export never replaces a folder silently" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert export_main([f"checkpoint={folder}", f"out={tmp_path / 'out'}", "overwrite=true"]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "keep.txt").exists()
    assert export_main([f"checkpoint={folder}", "output=x"]) == 2
    assert "Unknown argument 'output=x'" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "out")


def test_eval_and_chat_run_on_an_hf_folder(tmp_path, capsys):
    """`eval.py checkpoint=hf:<dir>` and `chat.py checkpoint=hf:<dir>` (in-process): the answers are the imported
    model's greedy tokens; eval's default output folder is inside <dir>."""
    from factory.eval import chat, cli

    folder = tmp_path / "hf"
    write_hf_llava(folder, "clip_llama")
    (tmp_path / "images").mkdir()
    image(11).save(tmp_path / "images" / "a.png")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question_id": "q1", "image": "a.png", "text": QUESTIONS[0]}) + "\n")
    model = factory.load_checkpoint(f"hf:{folder}")
    prompt = get_template(model.template).encode_prompt([{"from": "human", "value": "<image>\n" + QUESTIONS[0]}],
                                                        model.tokenizer, model.image_token_count)
    pixels = model.vision.image_transform(Image.open(tmp_path / "images" / "a.png"))[None]
    expected = model.tokenizer.decode(model.generate(torch.tensor([prompt]), pixel_values=pixels,
                                                     max_new_tokens=6)[0], skip_special_tokens=True).strip()
    assert chat.main([f"checkpoint=hf:{folder}", f"image={tmp_path / 'images' / 'a.png'}",
                      f"question={QUESTIONS[0]}", "max_new_tokens=6"]) == 0
    assert capsys.readouterr().out.strip() == expected
    assert cli.main([f"checkpoint=hf:{folder}", "benchmark=pope", f"question_file={questions}",
                     f"image_folder={tmp_path / 'images'}", "max_new_tokens=6"]) == 0
    answers = [json.loads(line) for line in (folder / "eval" / "pope" / "answers.jsonl").read_text().splitlines()]
    assert [a["text"] for a in answers] == [expected]
