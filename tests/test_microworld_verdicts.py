"""scripts/microworld_verdicts.py: each claim's rule on made-up rows (holds, does not hold, inconclusive)."""
from test_microworld import load_script


def row(acc, tp, f1=80.0, retention=100.0, lmar=(0.2, 0.2)):
    return {"accuracy": acc, "trainable_llm": tp, "retention": retention, "lmar": list(lmar),
            "pope": {"adversarial": {"f1": f1}}}


def rows(**variants):
    return {name: [row(*args) if isinstance(args, tuple) else row(args, 100) for args in seeds]
            for name, seeds in variants.items()}


def test_lora_parity_rules():
    v = load_script("microworld_verdicts")
    holds = rows(mores_r1=[(80.0, 100), (82.0, 100)], lora=[(82.0, 100_000), (83.0, 100_000)])
    assert v.lora_parity(holds).endswith("— holds.")
    far = rows(mores_r1=[(60.0, 100), (61.0, 100)], lora=[(82.0, 100_000), (83.0, 100_000)])
    assert v.lora_parity(far).endswith("— does not hold.")
    noisy = rows(mores_r1=[(70.0, 100), (80.0, 100)], lora=[(82.0, 100_000), (83.0, 100_000)])
    assert "inconclusive (the gap is within the seed noise" in v.lora_parity(noisy)
    one_seed = rows(mores_r1=[(78.0, 100)], lora=[(82.0, 100_000)])
    assert v.lora_parity(one_seed).endswith("— does not hold.")  # 4 points, no noise estimate: decided
    cheap_lora = rows(mores_r1=[(82.0, 100)], lora=[(82.0, 10_000)])
    assert "does not hold (fewer than 500× fewer parameters)" in v.lora_parity(cheap_lora)


def test_other_claims():
    v = load_script("microworld_verdicts")
    measured = {
        "mores_r1": [row(80, 100, f1=85, retention=100.0, lmar=(0.5, 0.5))],
        "mores_r2": [row(80.5, 200)], "mores_r4": [row(85, 400)],
        "lora": [row(82, 10**5, f1=70, retention=90.0, lmar=(0.2, 0.2))],
        "mores_pos_ratio1": [row(79, 100)], "mores_pos_ratio100": [row(80, 100)],
    }
    assert v.hallucinates_least(measured).endswith("— holds.")
    assert "holds (by construction" in v.keeps_knowledge(measured)
    assert v.rank_one_enough(measured).endswith("— does not hold.")  # rank 4 is 5 points better
    assert v.few_tokens_enough(measured).endswith("— holds.")
    assert v.raises_lmar(measured).endswith("— holds.")  # one seed: no noise estimate, the difference decides
    lines = v.verdicts(measured, ["lora", "mores_r1"])
    assert len(lines) == 6 and all(line.startswith("- **") for line in lines)
