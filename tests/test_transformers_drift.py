"""transformers drift: nothing the factory calls on transformers is deprecated.

A forward, a cached generate and training steps with activation checkpointing on (alone, and through the real
training loop on a DeepSpeed engine) of tiny models run under `deprecations_are_errors`: every FutureWarning and
DeprecationWarning is an error, and so is a deprecation notice transformers logs instead of warning (some go through
`logger.warning_once`). A transformers release that deprecates a name the factory uses fails here while the old name
still works. The warnings are not filtered by module: transformers attributes a deprecated keyword argument to the
frame that called the model (torch's Module.__call__), not to itself; the few deprecations another library's call
raises are listed, with who makes the call, in NOT_OURS.
"""
import logging
import warnings
from contextlib import contextmanager

import pytest
import torch

from factory.model.llava import enable_activation_checkpointing
from factory.testing import tiny_model
from factory.tuners import apply_tuning
from test_mores import make_batch  # not tests.test_mores: an installed package may own the name `tests`
from train_support import make_small_world, read_metrics, train_cfg

# Deprecations that another library's call into transformers raises, not the factory's: (message, who calls it).
NOT_OURS = [
    (r"`is_gradient_checkpointing` is deprecated", "peft's PeftModel.__init__ reads model.is_gradient_checkpointing"),
]
ONLY_LLM = {"vision": "frozen", "connector": "frozen", "llm": "tuner"}


@contextmanager
def deprecations_are_errors():
    """Every FutureWarning/DeprecationWarning raises (but NOT_OURS); transformers' logged deprecation notices are
    collected and must be none."""
    import transformers  # the test needs its logger; factory code reaches transformers through its own modules

    notices = []

    class Collect(logging.Handler):
        def emit(self, record):
            if "deprecat" in record.getMessage().lower():
                notices.append(record.getMessage())

    handler = Collect()
    logger = transformers.utils.logging.get_logger("transformers")
    logging.Logger.warning_once.cache_clear()  # a notice logged earlier in this process would otherwise be skipped
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            for message, _ in NOT_OURS:  # added last, so they take precedence over the errors above
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        logger.removeHandler(handler)
    assert notices == []


def test_the_check_catches_deprecations_but_the_listed_ones():
    """It can fail: a deprecation raised in transformers, one attributed to another module and a logged notice are
    caught; only a NOT_OURS message passes."""
    with pytest.raises(FutureWarning, match="gone in v6"):
        with deprecations_are_errors():
            warnings.warn_explicit("`old_name` is gone in v6", FutureWarning, "modeling_utils.py", 1,
                                   module="transformers.modeling_utils")
    with pytest.raises(DeprecationWarning):
        with deprecations_are_errors():
            warnings.warn_explicit("old keyword", DeprecationWarning, "module.py", 1, module="torch.nn.modules.module")
    with pytest.raises(AssertionError):
        with deprecations_are_errors():
            import transformers  # its logger, as transformers logs some deprecations instead of warning

            transformers.utils.logging.get_logger("transformers.x").warning_once("`foo` is deprecated, use `bar`")
    with deprecations_are_errors():
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)


def test_the_check_catches_the_old_cache_keyword():
    """What hf_cache.py avoids: the LLM called with `past_key_values`, renamed `cache` in transformers 5.24."""
    from factory.model.hf_cache import cache_argument

    model = tiny_model(llm="phi").eval()
    if cache_argument(model.llm) == "past_key_values":
        pytest.skip("this transformers version has no `cache` keyword yet, so `past_key_values` is not deprecated")
    embeds = torch.zeros(1, 3, model.llm.config.hidden_size)
    with torch.no_grad(), pytest.raises((FutureWarning, AssertionError)):
        with deprecations_are_errors():
            model.llm(inputs_embeds=embeds, past_key_values=None, use_cache=True)


@pytest.mark.parametrize("llm", ["phi", "llama"])
def test_forward_and_cached_generate_raise_no_deprecation(llm):
    """The LLM is called with the cache keyword its transformers version declares (factory/model/hf_cache.py)."""
    model = tiny_model(llm=llm).eval()
    ids, mask, pixels, labels = make_batch(model)
    with torch.no_grad(), deprecations_are_errors():
        out = model(ids, mask, pixels, labels=labels, use_cache=True)
        assert out.cache is not None and torch.isfinite(out.loss)
        step = model(ids[:, :1], torch.cat([mask, mask.new_ones(2, 1)], dim=1), cache=out.cache, use_cache=True)
        assert step.logits.shape == (2, 1, out.logits.shape[-1])
        answers = model.generate(ids, mask, pixels, max_new_tokens=3, eos_token_id=-1)
    assert [len(a) for a in answers] == [3, 3]


def _gradients(model, batch):
    ids, mask, pixels, labels = batch
    torch.manual_seed(0)  # the same dropout masks in both runs (checkpointing replays the RNG state it saw)
    model.zero_grad()
    model(ids, mask, pixels, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tuner", ["mores", "lora"])
def test_activation_checkpointing_raises_no_deprecation_and_keeps_the_gradients(tuner):
    """The factory's own method (one PEFT-wrapped LLM, one with MoReS hooks): checkpointing is on in every decoder
    block, and the gradients equal those without it (it only recomputes the forward)."""
    torch.manual_seed(0)
    model = tiny_model(llm="llama")
    apply_tuning(model, {"name": tuner}, tune=ONLY_LLM)
    model.train()
    batch = make_batch(model)
    expected = _gradients(model, batch)
    with deprecations_are_errors():
        model.activation_checkpointing_enable()
        got = _gradients(model, batch)
    blocks = [m for m in model.llm.modules() if hasattr(m, "gradient_checkpointing") and type(m).__name__.endswith(
        "DecoderLayer")]
    assert len(blocks) == 2 and all(b.gradient_checkpointing for b in blocks)
    assert set(got) == set(expected) and any(g.abs().sum() > 0 for g in got.values())
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_of_a_bare_hf_model_raises_no_deprecation():
    """enable_activation_checkpointing, also used on the HF LLaVA side of scripts/bench_throughput.py."""
    llm = tiny_model(llm="phi").llm
    with deprecations_are_errors():
        enable_activation_checkpointing(llm)
    assert any(getattr(m, "gradient_checkpointing", False) for m in llm.modules())
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers 5.24 on: the old name is deprecated
        with pytest.raises(FutureWarning, match="gradient_checkpointing_enable"), deprecations_are_errors():
            llm.gradient_checkpointing_enable()


def test_a_training_step_with_activation_checkpointing_raises_no_deprecation(tmp_path):
    """One optimizer step per stage through factory.train.run (pretrain, then instruct with PEFT LoRA), with
    trainer.gradient_checkpointing on: the loop, the engine and the checkpoint save raise no deprecation."""
    from factory.train import run

    world = make_small_world(tmp_path / "world")
    cfg = train_cfg(tmp_path / "run", world, tuner="lora",
                    **{"trainer.max_steps": 1, "trainer.gradient_checkpointing": True})
    with deprecations_are_errors():
        run(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [(r["stage"], r["step"]) for r in rows] == [("pretrain", 1), ("instruct", 1)]
    assert all(r["loss"] > 0 and r["loss"] == r["loss"] for r in rows)
