"""Scoring that reproduces each benchmark's official evaluation code, quirks included (protocol ``official``).

One module per benchmark family; docs/evaluation.md names the official file each one follows and every quirk kept.
The factory's own, more lenient rules stay in factory/eval/answer_metrics.py (protocol ``lenient``).
"""
from __future__ import annotations

from factory.errors import FactoryError

PROTOCOLS = ("official", "lenient")
DEFAULT_PROTOCOL = "official"
# MMMU's evaluation code seeds Python's `random` with 42 at import and guesses a letter for unparsable answers.
DEFAULT_SEED = 42


def check_protocol(protocol: str) -> str:
    """The protocol name, or a FactoryError saying which ones exist."""
    if protocol not in PROTOCOLS:
        raise FactoryError(f"Unknown scoring protocol {protocol!r}. Use `official` (the benchmarks' own evaluation "
                           f"code, bit for bit; the default) or `lenient` (the factory's friendlier answer parsing); "
                           f"see docs/evaluation.md.")
    return protocol
