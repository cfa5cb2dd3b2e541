"""factory.hf.attach: MoReS and the adapter hooked into a transformers LlavaForConditionalGeneration steer exactly as
the factory does (prefill logits, greedy tokens with a KV cache, a left-padded batch), and the tuner files
(factory/interop/tuner_files.py) are refused when they do not fit.

The HF base model is written here from the factory model's weights with the documented name mapping
(`vision.model.*` ↔ `model.vision_tower.*`, `connector.0/2.*` ↔ `model.multi_modal_projector.linear_1/2.*`,
`llm.model.*` ↔ `model.language_model.*`, `llm.lm_head.*` ↔ `lm_head.*`) and the `<image>` token appended to the
vocabulary (id 512, as llava-hf checkpoints hold it), then loaded back with from_pretrained as a user would.
"""
import json

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from factory.constants import IMAGE_TOKEN_INDEX
from factory.errors import FactoryError
from factory.hf import attach
from factory.interop.tuner_files import SETTINGS_FILE, WEIGHTS_FILE, read_tuner_files, write_tuner_files
from factory.model.llava import positions_from_mask
from factory.testing import tiny_model
from factory.tuners import apply_tuning

VOCAB, IMAGE_ID, PAD = 512, 512, 3


def hf_weights(model):
    """The factory model's weights under HF Llava names (vocabulary + the <image> row)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("llm.mores.") or ".adapter." in name:
            continue  # the tuner travels in the tuner files
        if name.startswith("vision.model."):
            out["model.vision_tower." + name[len("vision.model."):]] = tensor
        elif name.startswith("connector."):
            index, rest = name[len("connector."):].split(".", 1)
            out[f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"] = tensor
        elif name.startswith("llm.model."):
            out["model.language_model." + name[len("llm.model."):]] = tensor
        elif name == "llm.lm_head.weight":
            out["lm_head.weight"] = tensor
        elif name == "llm.lm_head.bias":
            assert float(tensor.abs().max()) == 0.0, "HF Llava's lm_head has no bias"
        else:
            raise AssertionError(f"unmapped weight {name}")
    embed = out["model.language_model.embed_tokens.weight"]
    out["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed[:1] * 0], 0)
    out["lm_head.weight"] = torch.cat([out["lm_head.weight"], out["lm_head.weight"][:1] * 0], 0)
    return out


def export_hf_base(model, folder):
    """Write the HF Llava equivalent of `model` (without its tuner) to `folder` and load it back."""
    text = model.llm.config.to_dict()
    text.update(vocab_size=VOCAB + 1, tie_word_embeddings=False)
    strategy = "default" if model.config["vision"]["name"] == "hf_clip" else "full"
    config = LlavaConfig(text_config=text, vision_config=model.vision.model.config.to_dict(),
                         image_token_id=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                         projector_hidden_act="gelu", multi_modal_projector_bias=True, tie_word_embeddings=False)
    hf = LlavaForConditionalGeneration(config)
    missing, unexpected = hf.load_state_dict(hf_weights(model), strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (missing, unexpected)
    hf.save_pretrained(folder)
    return LlavaForConditionalGeneration.from_pretrained(folder).eval()


def tuned(tuner, llm, vision):
    model = tiny_model(llm=llm, vision=vision, seed=1)
    if llm == "phi":
        torch.nn.init.zeros_(model.llm.lm_head.bias)  # HF Llava cannot hold Phi's lm_head bias
    model.config["tuner"] = dict(tuner)
    apply_tuning(model, tuner)
    torch.manual_seed(2)
    with torch.no_grad():  # trained-looking adapters (their up projection starts at zero; MoReS starts non-zero)
        for name, p in model.llm.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.5)
    return model.eval()


def batch(n_image):
    """Two prompts of different lengths around one image each, left-padded: factory ids and HF ids."""
    rows = [[5, 6, 7, 30] + [IMAGE_TOKEN_INDEX] * n_image + [8, 9, 10, 11, 40],
            [12] + [IMAGE_TOKEN_INDEX] * n_image + [13, 14]]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32)
    return ids, mask, pixels, ids.masked_fill(ids == IMAGE_TOKEN_INDEX, IMAGE_ID)


CASES = {"mores-clip-llama": ({"name": "mores", "positions": "f2+l3"}, "llama", "hf_clip"),
         "mores-siglip-phi": ({"name": "mores", "positions": "f2+l3", "rank": 2}, "phi", "hf_siglip"),
         "adapter-siglip-phi": ({"name": "adapter", "bottleneck": 8}, "phi", "hf_siglip"),
         "adapter-clip-llama": ({"name": "adapter", "bottleneck": 8}, "llama", "hf_clip")}


@pytest.mark.parametrize("case", list(CASES))
def test_attached_hf_model_steers_as_the_factory(case, tmp_path):
    tuner, llm, vision = CASES[case]
    model = tuned(tuner, llm, vision)
    hf = export_hf_base(model, tmp_path)
    write_tuner_files(model, {"tuner": tuner["name"]}, tmp_path)
    ids, mask, pixels, hf_ids = batch(model.image_token_count)
    real = mask.bool()
    with torch.no_grad():
        base = hf(input_ids=hf_ids, attention_mask=mask, pixel_values=pixels,
                  position_ids=positions_from_mask(mask, ids.shape[1])).logits[..., :VOCAB]
        handle = attach(hf, tmp_path)
        ours = model(ids, mask, pixels).logits
        theirs = hf(input_ids=hf_ids, attention_mask=mask, pixel_values=pixels,
                    position_ids=positions_from_mask(mask, ids.shape[1])).logits[..., :VOCAB]
    delta = float((ours - theirs)[real].abs().max())
    print(f"{case}: prefill max |Δlogit| = {delta:.3g}")
    assert delta == 0.0  # the same modules on the same tensors
    assert float((theirs - base)[real].abs().max()) > 1e-3  # the tuner does change the output
    factory_tokens = model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=[])
    hf_out = hf.generate(input_ids=hf_ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6,
                         do_sample=False, eos_token_id=None, pad_token_id=PAD)
    hf_tokens = hf_out[:, ids.shape[1]:].tolist()
    print(f"{case}: greedy factory {factory_tokens} HF {hf_tokens}")
    assert hf_tokens == factory_tokens
    handle.detach()
    with torch.no_grad():
        again = hf(input_ids=hf_ids, attention_mask=mask, pixel_values=pixels,
                   position_ids=positions_from_mask(mask, ids.shape[1])).logits[..., :VOCAB]
    assert torch.equal(again, base)
    assert set(hf.state_dict()) == set(LlavaForConditionalGeneration.from_pretrained(tmp_path).state_dict())


def test_mores_is_not_applied_on_decode_steps(tmp_path):
    model = tuned({"name": "mores"}, "llama", "hf_clip")
    hf = export_hf_base(model, tmp_path)
    write_tuner_files(model, {"tuner": "mores"}, tmp_path)
    attach(hf, tmp_path)
    mores = hf.model.language_model.mores
    steered = []  # rows MoReS steered in each call of the first decoder layer (its hook runs before this one)
    hf.model.language_model.layers[0].register_forward_hook(lambda *_: steered.append(int(mores._rows[0].numel())))
    ids, mask, pixels, hf_ids = batch(model.image_token_count)
    hf.generate(input_ids=hf_ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, do_sample=False,
                eos_token_id=None, pad_token_id=PAD)
    assert steered == [2 * 9, 0, 0]  # prefill: f4+l5 of 16 image tokens in two rows; two decode steps: nothing


def test_tuner_files_are_refused_when_they_do_not_fit(tmp_path):
    model = tuned({"name": "mores"}, "llama", "hf_clip")
    hf = export_hf_base(model, tmp_path / "hf")
    with pytest.raises(FactoryError, match="has no tuner files"):
        attach(hf, tmp_path / "hf")
    write_tuner_files(model, {"tuner": "mores"}, tmp_path / "hf")
    with pytest.raises(FactoryError, match="never overwritten"):
        write_tuner_files(model, {"tuner": "mores"}, tmp_path / "hf")
    handle = attach(hf, tmp_path / "hf")
    with pytest.raises(FactoryError, match="already carries"):
        attach(hf, tmp_path / "hf")
    ids, mask, pixels, hf_ids = batch(model.image_token_count)
    with pytest.raises(FactoryError, match="needs `input_ids`"):
        hf(inputs_embeds=hf.get_input_embeddings()(hf_ids), attention_mask=mask)
    handle.detach()
    other = export_hf_base(tiny_model(llm="llama", vision="hf_clip", layers=3), tmp_path / "other")
    with pytest.raises(FactoryError, match=r"\(layers, hidden size, model type\)"):
        attach(other, tmp_path / "hf")
    settings = json.loads((tmp_path / "hf" / SETTINGS_FILE).read_text())
    (tmp_path / "hf" / SETTINGS_FILE).write_text(json.dumps({**settings, "format": "something"}))
    with pytest.raises(FactoryError, match="not a factory tuner settings file"):
        read_tuner_files(tmp_path / "hf")
    (tmp_path / "hf" / WEIGHTS_FILE).write_bytes(b"garbage")
    (tmp_path / "hf" / SETTINGS_FILE).write_text(json.dumps(settings))
    with pytest.raises(FactoryError, match="corrupt or truncated"):
        read_tuner_files(tmp_path / "hf")
    lora = tiny_model(llm="llama", vision="hf_clip")
    with pytest.raises(FactoryError, match="cannot be merged"):
        write_tuner_files(lora, {"tuner": "lora"}, tmp_path / "other")
