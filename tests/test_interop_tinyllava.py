"""`tinyllava:<dir>`: TinyLLaVA Factory's per-component checkpoint and LLaVA-Steering's MoReS files (docs/interop.md).

A tiny checkpoint is written here in their layout (config.json with model_type `tinyllava`, language_model/,
vision_tower/, connector/ with pytorch_model.bin, the tokenizer, and for LLaVA-Steering mores/language_model/ with
one intkey_*.bin per layer holding W, b and the materialised R) from a model built directly by the factory with the
same options (vision.feature_select=patch, tuner=mores with positions_rule=llava_steering). The imported model must
compute the same logits (max |Δ| = 0.0 in fp32, left-padded batch) and greedy tokens; an independent
re-implementation of LLaVA-Steering's intervention (their formula on the materialised R, their sys_length window)
checks what the options mean; layouts that cannot be mapped are refused with the file and key.
"""
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import factory
from factory import checkpoint as ckpt
from factory.constants import IMAGE_TOKEN_INDEX
from factory.data.templates import V1Template, get_template
from factory.errors import FactoryError
from factory.interop.tinyllava_mores import MORES_DIR, steering_offset, tinyllava_prompt_ids
from factory.model.build import build_model
from factory.model.llms import decoder_layers
from factory.testing import tiny_config
from factory.tuners import apply_tuning

FAMILIES = {"siglip_phi": ("phi", "hf_siglip"), "clip_llama": ("llama", "hf_clip")}
# the same two prompts, left-padded as generation sees them, as the HF Llava tests (tests import each other directly)
from test_interop_hf import QUESTIONS, prompt_batch  # noqa: E402
POSITIONS = "f4+l5"


def image(seed, size=(30, 20)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def direct_model(family, mores=True, offset=1, seed=0):
    """The factory model built directly with TinyLLaVA's options: feature_select=patch (the first token dropped
    even for SigLIP), and LLaVA-Steering's MoReS (f4+l5, positions_rule=llava_steering, the given offset). Every
    weight is moved away from its init; R is a random orthonormal D×1 matrix loaded as a materialised R."""
    llm, vision = FAMILIES[family]
    cfg = tiny_config(llm=llm, vision=vision, seed=seed)
    cfg.vision.feature_select = "patch"
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rotations = {}
    if mores:
        options = {"name": "mores", "rank": 1, "layers": "all", "positions": POSITIONS, "modality": "vision",
                   "dropout": 0.05, "positions_rule": "llava_steering", "positions_offset": offset}
        apply_tuning(model, options, {"vision": "frozen", "connector": "frozen", "llm": "tuner"})
        with torch.no_grad():
            for key, intervention in model.llm.mores.interventions.items():
                intervention.project.weight.normal_(0, 0.5)
                intervention.project.bias.normal_(0, 0.5)
                rotations[int(key)] = torch.linalg.qr(torch.randn(intervention.project.weight.shape[1], 1))[0]
                intervention.load_rotation(rotations[int(key)])
    return model.eval(), rotations


def write_tinyllava(folder, model, rotations=None, strategy="patch", aspect="pad", mores_pos=None):
    """`model`'s weights in TinyLLaVA Factory's saved layout (their recipe's `save`), plus LLaVA-Steering's MoReS
    files when `rotations` is given."""
    folder.mkdir(parents=True)
    tower, llm = model.vision.model, model.llm
    config = {"model_type": "tinyllava", "llm_model_name_or_path": "microsoft/phi-2",
              "vision_model_name_or_path": "google/siglip-so400m-patch14-384", "vision_model_name_or_path2": "",
              "connector_type": "mlp2x_gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": strategy,
              "image_aspect_ratio": aspect, "tokenizer_padding_side": "right", "pad_token_id": 3,
              "text_config": llm.config.to_dict(), "vision_config": tower.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config))
    model.tokenizer.save_pretrained(str(folder))
    for name, module in (("language_model", llm), ("vision_tower", tower)):
        (folder / name).mkdir()
        state = {k: v for k, v in module.named_parameters() if "mores" not in k}
        torch.save(state, folder / name / "pytorch_model.bin")
        module.config.save_pretrained(str(folder / name))
    (folder / "connector").mkdir()
    torch.save({f"_connector.{k}": v for k, v in model.connector.state_dict().items()},
               folder / "connector" / "pytorch_model.bin")
    if rotations is not None:
        root = folder / MORES_DIR
        root.mkdir(parents=True)
        reps = []
        for key, intervention in model.llm.mores.interventions.items():
            torch.save({"weight": intervention.project.weight.detach().clone(),
                        "bias": intervention.project.bias.detach().clone(), "rotate_layer": rotations[int(key)]},
                       root / f"intkey_layer.{key}.comp.block_output.unit.pos.nunit.1#0.bin")
            reps.append({"layer": int(key), "component": "block_output", "low_rank_dimension": 1,
                         "intervention": {"type": "mores", "embed_dim": intervention.project.weight.shape[1],
                                          "low_rank_dimension": 1, "dropout": 0.05}})
        (root / "intervention_config.json").write_text(json.dumps({"representations": reps}))
        pos = {"intervention_positions": POSITIONS, "mores_share_weights": True,
               "intervened_prompt_part": "first_round", "intervene_modality": "vis",
               "num_interventions": {"llm": len(reps)}, "img_embed_token_len": model.image_token_count}
        pos.update(mores_pos or {})
        (root / "mores_pos_configs.json").write_text(json.dumps(pos))
    return folder


def compare(a, b, images):
    """(max |Δlogit| over the real tokens of a left-padded batch, greedy tokens of a, greedy tokens of b)."""
    input_ids, mask, pixels = prompt_batch(a, images)
    with torch.no_grad():
        la, lb = a(input_ids, mask, pixels).logits, b(input_ids, mask, pixels).logits
    delta = (la - lb)[mask.bool()].abs().max().item()
    return delta, a.generate(input_ids, mask, pixels, max_new_tokens=8), b.generate(input_ids, mask, pixels,
                                                                                   max_new_tokens=8)


# ------------------------------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llava_steering_checkpoint_computes_what_the_direct_model_computes(tmp_path, family):
    direct, rotations = direct_model(family)
    folder = write_tinyllava(tmp_path / "ckpt", direct, rotations)
    model = factory.load_checkpoint(f"tinyllava:{folder}")
    # `patch` drops the first token: CLIP's CLS (16 patches stay), and for SigLIP a patch token (16 → 15)
    assert model.image_token_count == (15 if family == "siglip_phi" else 16)
    assert model.template == ("phi" if family == "siglip_phi" else "vicuna_v1")
    mores = model.llm.mores
    assert (mores.positions_rule, mores.positions_offset, mores.positions_spec) == ("llava_steering", 1, POSITIONS)
    assert mores.layer_ids == [0, 1] and mores.rank == 1
    for key, intervention in mores.interventions.items():  # R recovered from the materialised one to fp32 rounding
        assert (intervention.rotation() - rotations[int(key)]).abs().max().item() < 1e-6
    delta, ours, theirs = compare(model, direct, [image(0), image(1, (20, 30))])
    print(f"\ntinyllava import {family} (MoReS, llava_steering): max |dlogit| = {delta}, greedy {ours}")
    assert delta == 0.0
    assert ours == theirs and all(len(t) > 0 for t in ours)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tinyllava_factory_checkpoint_without_mores(tmp_path, family):
    direct, _ = direct_model(family, mores=False)
    folder = write_tinyllava(tmp_path / "ckpt", direct)
    model = ckpt.import_model(f"tinyllava:{folder}").eval()
    assert getattr(model.llm, "mores", None) is None
    assert model.vision.feature_select == "patch" and model.vision.image_aspect == "pad"
    delta, ours, theirs = compare(model, direct, [image(2), image(3, (20, 30))])
    print(f"\ntinyllava import {family} (no tuner): max |dlogit| = {delta}, greedy {ours}")
    assert delta == 0.0 and ours == theirs


def test_the_offset_is_their_sys_length_minus_the_image_start(tmp_path):
    """LLaVA-Steering's window starts at sys_length = len(ids("SYSTEM USER: <image>\\nq ")) − len(ids("<image>\\nq")):
    with a byte-level BPE (Phi-2, the tiny tokenizer) the trailing space is a token of its own, one past the image."""
    direct, _ = direct_model("siglip_phi", mores=False)
    tok = direct.tokenizer
    assert steering_offset(tok, V1Template.system) == 1
    content = "<image>\nWhat is in the image?"
    prompt = tinyllava_prompt_ids(tok, f"{V1Template.system} USER: {content} ")
    assert prompt.count(IMAGE_TOKEN_INDEX) == 1
    # the factory's phi prompt puts the image where TinyLLaVA's does
    ours = get_template("phi").encode_prompt([{"from": "human", "value": content}], tok, 1)
    assert ours.index(IMAGE_TOKEN_INDEX) == prompt.index(IMAGE_TOKEN_INDEX)


def test_their_intervention_reimplemented_gives_the_same_logits(tmp_path):
    """LLaVA-Steering's computation written out independently: base + (base·Wᵀ + b − base·R)·Rᵀ (fp32) on the
    materialised R, at the first min(n//2, 4) and last min(n//2, 5) positions of the window [sys_length, sys_length
    + n) of the expanded sequence, on the base model without MoReS. The import reproduces it to fp32 rounding (R is
    stored as householder reflectors)."""
    direct, rotations = direct_model("siglip_phi")
    folder = write_tinyllava(tmp_path / "ckpt", direct, rotations)
    model = factory.load_checkpoint(f"tinyllava:{folder}")
    base = ckpt.import_model(f"tinyllava:{folder}").eval()
    base.llm.mores.detach()  # the same weights, their intervention instead of ours
    base.batch_observers.remove(base.llm.mores)
    input_ids, mask, pixels = prompt_batch(model, [image(4), image(5)])
    n = model.image_token_count
    windows = []
    for row, q in zip(input_ids.tolist(), QUESTIONS):
        content = f"<image>\n{q}"
        prompt = tinyllava_prompt_ids(model.tokenizer, f"{V1Template.system} USER: {content} ")
        sys_length = len(prompt) - len(tinyllava_prompt_ids(model.tokenizer, content))
        pad = row.index(IMAGE_TOKEN_INDEX) - prompt.index(IMAGE_TOKEN_INDEX)  # left padding of this row
        first, last = min(n // 2, 4), min(n // 2, 5)
        windows.append([pad + sys_length + i for i in list(range(first)) + list(range(n - last, n))])
    files = {int(p.name.split(".")[1]): torch.load(p, weights_only=True) for p in (folder / MORES_DIR).glob("*.bin")}

    def hook(layer):
        def steer(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            w, b, r = files[layer]["weight"], files[layer]["bias"], files[layer]["rotate_layer"]
            for i, where in enumerate(windows):
                h = hidden[i, where].float()
                hidden[i, where] = (h + (h @ w.t() + b - h @ r) @ r.t()).to(hidden.dtype)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        return steer

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(decoder_layers(base.llm))]
    with torch.no_grad():
        theirs = base(input_ids, mask, pixels).logits
        ours = model(input_ids, mask, pixels).logits
        for handle in handles:
            handle.remove()
        plain = base(input_ids, mask, pixels).logits
    delta = (ours - theirs)[mask.bool()].abs().max().item()
    print(f"\ntinyllava MoReS vs their formula re-implemented: max |dlogit| = {delta}")
    assert delta < 1e-5
    assert (ours - plain)[mask.bool()].abs().max().item() > 1e-3  # the steering does change the logits


def test_a_stage_can_start_from_a_tinyllava_folder(tmp_path):
    direct, _ = direct_model("clip_llama", mores=False)
    folder = write_tinyllava(tmp_path / "ckpt", direct)
    model = ckpt.import_model(f"tinyllava:{folder}", template="vicuna_v1_natural")
    assert model.template == "vicuna_v1_natural" and model.config["init_from"] == f"tinyllava:{folder}"


# ------------------------------------------------------------------------------------------------- refused layouts
def edit(path, **changes):
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


def refused(folder, pattern):
    with pytest.raises(FactoryError, match=pattern):
        factory.load_checkpoint(f"tinyllava:{folder}")


def test_layouts_that_cannot_be_mapped_are_refused(tmp_path):
    direct, rotations = direct_model("siglip_phi")
    folder = write_tinyllava(tmp_path / "ckpt", direct, rotations)
    config = folder / "config.json"
    edit(config, connector_type="resampler")
    refused(folder, r"config.json: connector_type='resampler' has no exact factory connector")
    edit(config, connector_type="mlp2x_gelu", vision_model_name_or_path2="facebook/dinov2-large")
    refused(folder, r"vision_model_name_or_path2=.*second vision tower")
    edit(config, vision_model_name_or_path2="", image_aspect_ratio="anyres")
    refused(folder, r"image_aspect_ratio='anyres' \(anyres tiling\) is not supported")
    edit(config, image_aspect_ratio="pad", vision_feature_select_strategy="cls")
    refused(folder, r"vision_feature_select_strategy='cls' is unknown \(patch \| cls_patch\)")
    edit(config, vision_feature_select_strategy="cls_patch")  # 16 tokens, but their MoReS was trained on 15
    refused(folder, r"mores_pos_configs.json: img_embed_token_len=15, but the imported vision tower gives 16 image")
    edit(config, vision_feature_select_strategy="patch", model_type="llava")
    refused(folder, r"describes a 'llava' model; `tinyllava:<dir>` imports TinyLLaVA Factory folders")
    edit(config, model_type="tinyllava")
    assert factory.load_checkpoint(f"tinyllava:{folder}") is not None  # restored: imports again
    pos = folder / MORES_DIR / "mores_pos_configs.json"
    edit(pos, intervention_positions="uniform9")
    refused(folder, r"intervention_positions='uniform9' is not supported")
    edit(pos, intervention_positions=POSITIONS, mores_share_weights=False)
    refused(folder, r"mores_share_weights=false")
    edit(pos, mores_share_weights=True, intervene_modality="vis+text")
    refused(folder, r"intervene_modality='vis\+text' is not supported")
    pos.write_text(json.dumps([{}, {}]))
    refused(folder, r"holds 2 position configs \(a second MoReS")
    pos.unlink()
    refused(folder, r"mores_pos_configs.json is missing")


def test_intervention_files_that_are_not_mores_are_refused(tmp_path):
    direct, rotations = direct_model("siglip_phi")
    folder = write_tinyllava(tmp_path / "ckpt", direct, rotations)
    root = folder / MORES_DIR
    edit(root / "intervention_config.json",
         representations=[{"layer": 0, "component": "block_output", "intervention": {"type": "norot_mores"}}])
    refused(folder, r"intervention of type 'norot_mores'.*not the factory's MoReS")
    (root / "intervention_config.json").unlink()
    layer0 = root / "intkey_layer.0.comp.block_output.unit.pos.nunit.1#0.bin"
    state = torch.load(layer0, weights_only=True)
    torch.save({"weight": state["weight"], "bias": state["bias"], "rotate_layer": 2 * state["rotate_layer"]}, layer0)
    refused(folder, r"does not have orthonormal columns")
    layer0.rename(root / "intkey_layer.0.comp.mlp_output.unit.pos.nunit.1#0.bin")
    refused(folder, r"imports MoReS on decoder block outputs")
    # a pickle that needs code to load is refused by the weights-only load, never run
    (root / "intkey_layer.0.comp.mlp_output.unit.pos.nunit.1#0.bin").unlink()
    layer0.write_bytes(pickle.dumps({"weight": _Code()}))
    with pytest.raises(FactoryError, match=r"intkey_layer.0"):
        factory.load_checkpoint(f"tinyllava:{folder}")


class _Code:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_missing_components_and_whole_model_files_are_named(tmp_path):
    direct, _ = direct_model("clip_llama", mores=False)
    folder = write_tinyllava(tmp_path / "ckpt", direct)
    (folder / "connector" / "pytorch_model.bin").unlink()
    refused(folder, r"connector/pytorch_model.bin is missing or is not a state dict")
    state = torch.load(folder / "language_model" / "pytorch_model.bin", weights_only=True)
    state.pop("model.norm.weight")
    torch.save(state, folder / "language_model" / "pytorch_model.bin")
    refused(folder, r"do not fit the language model: missing 1 \(model.norm.weight\)")
    (folder / "language_model" / "pytorch_model.bin").rename(folder / "pytorch_model.bin")
    refused(folder, r"holds the whole TinyLLaVA model in pytorch_model.bin .* not the per-component layout")
    with pytest.raises(FactoryError, match=r"tinyllava:.*nope: no such folder"):
        factory.load_checkpoint(f"tinyllava:{tmp_path / 'nope'}")


# ------------------------------------------------------------------------------------------------ export and attach
def test_export_writes_hf_llava_and_their_mores_as_tuner_files(tmp_path):
    """tinyllava:<dir> (CLIP + Llama, LLaVA-Steering MoReS) → python -m factory.export → transformers' Llava with
    factory.hf.attach: the same logits and greedy tokens as the imported model (their position rule travels in the
    tuner settings)."""
    from factory.export import export
    from factory.hf import attach
    from test_interop_hf import compare as compare_hf, load_export

    direct, rotations = direct_model("clip_llama")
    folder = write_tinyllava(tmp_path / "ckpt", direct, rotations)
    result = export(f"tinyllava:{folder}", str(tmp_path / "out"))
    assert result["tuner"] == "mores" and result["vision_feature_select_strategy"] == "default"
    assert sorted(result["tuner_files"]) == ["factory_tuner.json", "factory_tuner.safetensors"]
    settings = json.loads((tmp_path / "out" / "factory_tuner.json").read_text())
    assert (settings["options"]["positions_rule"], settings["options"]["positions_offset"]) == ("llava_steering", 1)
    ours = factory.load_checkpoint(f"tinyllava:{folder}")
    hf, _ = load_export(tmp_path / "out", backend="pil")
    handle = attach(hf, tmp_path / "out")
    delta, our_tokens, hf_tokens = compare_hf(ours, hf, [image(6), image(7, (20, 30))])
    print(f"\ntinyllava clip_llama MoReS export + attach: max |dlogit| = {delta}, greedy {our_tokens}")
    assert delta == 0.0 and our_tokens == hf_tokens
    handle.detach()


def test_phi_export_is_refused_for_its_lm_head_bias(tmp_path):
    from factory.export import export

    direct, rotations = direct_model("siglip_phi")
    folder = write_tinyllava(tmp_path / "ckpt", direct, rotations)
    with pytest.raises(FactoryError, match=r"lm_head has a non-zero bias"):
        export(f"tinyllava:{folder}", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
