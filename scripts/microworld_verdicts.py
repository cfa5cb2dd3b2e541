"""The verdict on each claim of the paper, from the micro-world comparison's measured rows (one line per claim).

Each rule is fixed before the numbers are seen and printed with them. A difference counts only when it is larger
than the seeds' noise: `noise` = twice the larger of the two standard deviations over seeds (0 with one seed: the
rules then decide on the means alone, which the line's "± 0.0" shows). The thresholds are the paper's words made numbers: "within a
few points" = 3 points of accuracy; "rank 1 is enough" and "~1 % of the tokens is enough" = within 2 points of the
best of the larger settings; "keeps world knowledge" = retention ≥ 99 %.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Tuple

Rows = Dict[str, List[dict]]


def _stats(rows: List[dict], value) -> Tuple[float, float]:
    values = [value(r) for r in rows if value(r) is not None]
    if not values:
        return float("nan"), 0.0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _noise(*stds: float) -> float:
    return 2 * max(stds)


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def _acc(r):
    return r["accuracy"]


def _adv_f1(r):
    return r["pope"]["adversarial"]["f1"]


def _lmar(r):
    return statistics.mean(r["lmar"])


def _close_call(gap: float, limit: float, noise: float, seeds: int) -> Optional[str]:
    """'inconclusive (…)' when the gap is beyond `limit` but within the noise; None when the rule decides."""
    if gap > limit and gap - noise <= limit and seeds > 1:
        return f"inconclusive (the gap is within the seed noise ±{noise:.1f})"
    return None


def lora_parity(rows: Rows) -> Optional[str]:
    if "mores_r1" not in rows or not any(k in rows for k in ("lora", "lora_r8")):
        return None
    m, m_sd = _stats(rows["mores_r1"], _acc)
    parts, verdicts = [], []
    for name in ("lora", "lora_r8"):
        if name not in rows:
            continue
        lo, lo_sd = _stats(rows[name], _acc)
        ratio = rows[name][0]["trainable_llm"] / max(1, rows["mores_r1"][0]["trainable_llm"])
        gap = lo - m
        parts.append(f"{name} {_fmt(lo, lo_sd)} % at {ratio:,.0f}× MoReS's TP*")
        close = _close_call(gap, 3.0, _noise(m_sd, lo_sd), len(rows["mores_r1"]))
        verdicts.append("does not hold (fewer than 500× fewer parameters)" if ratio < 500 and name == "lora"
                        else close or ("holds" if gap <= 3.0 else "does not hold"))
    verdict = verdicts[0] if len(set(verdicts)) == 1 else "; ".join(f"vs {n}: {v}" for n, v in
                                                                     zip(("lora", "lora_r8"), verdicts))
    return (f"**MoReS within a few points (≤ 3) of LoRA at ≥ 500× fewer LLM parameters**: MoReS rank 1 "
            f"{_fmt(m, m_sd)} %, {'; '.join(parts)} — {verdict}.")


def hallucinates_least(rows: Rows) -> Optional[str]:
    if "mores_r1" not in rows or len(rows) < 2:
        return None
    scores = {v: _stats(r, _adv_f1) for v, r in rows.items()}
    best_other = max((v for v in scores if v != "mores_r1"), key=lambda v: scores[v][0])
    m, m_sd = scores["mores_r1"]
    b, b_sd = scores[best_other]
    gap = b - m
    close = _close_call(gap, 0.0, _noise(m_sd, b_sd), len(rows["mores_r1"]))
    verdict = close or ("holds" if gap <= 0 else "does not hold")
    return (f"**MoReS hallucinates least** (POPE adversarial F1, the sampling where the language prior misleads): "
            f"MoReS rank 1 {_fmt(m, m_sd)}, best other {best_other} {_fmt(b, b_sd)} — {verdict}.")


def keeps_knowledge(rows: Rows) -> Optional[str]:
    if "mores_r1" not in rows:
        return None
    m, m_sd = _stats(rows["mores_r1"], lambda r: r["retention"])
    others = ", ".join(f"{v} {_stats(r, lambda x: x['retention'])[0]:.1f}" for v, r in rows.items()
                       if v != "mores_r1")
    verdict = "holds" if m >= 99.0 else "does not hold"
    why = (" (by construction: with a text-only prompt there is no image token to steer, so MoReS leaves the LM "
           "exactly as it was)" if m >= 99.0 else "")
    return (f"**MoReS keeps world knowledge** (text-only reading of the held-out captions, % of the base LM's): "
            f"MoReS rank 1 {_fmt(m, m_sd)}; {others} — {verdict}{why}.")


def _enough(rows: Rows, small: str, larger: List[str]) -> Tuple[str, str]:
    """(small's accuracy, the larger settings' accuracies and the ruling): holds when `small` is at most 2 points
    below the best of `larger`."""
    m, m_sd = _stats(rows[small], _acc)
    best = max(larger, key=lambda v: _stats(rows[v], _acc)[0])
    b, b_sd = _stats(rows[best], _acc)
    gap = b - m
    verdict = _close_call(gap, 2.0, _noise(m_sd, b_sd), len(rows[small])) or (
        "holds" if gap <= 2.0 else "does not hold")
    listed = ", ".join(f"{v} {_fmt(*_stats(rows[v], _acc))}" for v in larger)
    return f"{_fmt(m, m_sd)}; {listed}", verdict


def rank_one_enough(rows: Rows) -> Optional[str]:
    larger = [v for v in ("mores_r2", "mores_r4", "mores_r8") if v in rows]
    if "mores_r1" not in rows or not larger:
        return None
    numbers, verdict = _enough(rows, "mores_r1", larger)
    return f"**Rank 1 is enough** (≤ 2 points below the best larger rank): rank 1 {numbers} — {verdict}."


def few_tokens_enough(rows: Rows) -> Optional[str]:
    larger = [v for v in ("mores_r1", "mores_pos_ratio25", "mores_pos_ratio50", "mores_pos_ratio100") if v in rows]
    if "mores_pos_ratio1" not in rows or not larger:
        return None
    numbers, verdict = _enough(rows, "mores_pos_ratio1", larger)
    return (f"**~1 % of the visual tokens is enough** (ratio=0.01: 1 of the 16 image tokens, ≤ 2 points below the "
            f"best larger share; mores_r1 is f4+l5 = 9 of 16): {numbers} — {verdict}.")


def raises_lmar(rows: Rows) -> Optional[str]:
    baselines = [v for v in ("lora", "lora_r8", "full") if v in rows]
    if "mores_r1" not in rows or not baselines:
        return None
    m, m_sd = _stats(rows["mores_r1"], _lmar)
    parts, verdicts = [], []
    for v in baselines:
        b, b_sd = _stats(rows[v], _lmar)
        parts.append(f"{v} {b:.3f} ± {b_sd:.3f}")
        if m - b > _noise(m_sd, b_sd):
            verdicts.append("holds")
        elif b - m > _noise(m_sd, b_sd):
            verdicts.append("does not hold")
        else:
            verdicts.append("inconclusive (one seed)" if len(rows["mores_r1"]) < 2 else
                            "inconclusive (within the seed noise)")
    verdict = verdicts[0] if len(set(verdicts)) == 1 else "; ".join(f"vs {v}: {x}" for v, x in zip(baselines, verdicts))
    return (f"**MoReS raises the visual attention share (LMAR, mean over layers)**: MoReS rank 1 {m:.3f} ± "
            f"{m_sd:.3f}; {'; '.join(parts)} — {verdict}.")


CLAIMS = (lora_parity, hallucinates_least, keeps_knowledge, rank_one_enough, few_tokens_enough, raises_lmar)


def verdicts(rows_by_variant: Rows, main: List[str]) -> List[str]:
    """One line per claim that the measured variants can decide (a claim whose runs are missing is left out).
    `main`: the main-table variants (the "least" and "raises" claims compare MoReS with these only)."""
    main_rows = {v: rows_by_variant[v] for v in main if v in rows_by_variant}
    lines = []
    for claim in CLAIMS:
        scope = main_rows if claim in (hallucinates_least, keeps_knowledge, raises_lmar, lora_parity) else rows_by_variant
        line = claim(scope)
        if line:
            lines.append(f"- {line}")
    return lines
