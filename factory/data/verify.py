"""`data.verify_images=true`: scan a whole dataset before training and list every fault at once.

Without it, an unreadable image or a caption the tokenizer cannot encode is met only when the loop reaches it (and is
then skipped or stops the run, per `data.on_bad_sample`). The scan finds all of them in one pass, before any step:

- every image is opened and decoded completely through the training path (factory.data.images.open_image: corrupt
  or truncated files, decompression bombs, extreme aspect ratios), on a thread pool: Pillow's decoders release the
  GIL, so threads scale without copying the dataset into processes;
- every entry's text is tokenized with the run's template and max_length (lone surrogates, tokenizer failures),
  in the calling thread, because a fast tokenizer shared between threads can fail with "Already borrowed";
- image samples whose image span max_length would cut are listed as over-length (the run skips those anyway).

Rank 0 scans (with a progress bar), the other ranks wait and receive the list. The full list goes to
`<run_dir>/data_faults_<stage>.txt`; the message shows the first ones. With on_bad_sample=error any bad sample stops
the run there; with skip the bad samples are marked on the dataset (skipped without decoding them again) unless
they are more than data.max_bad_fraction of the dataset.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from factory.data.llava_json import BadSampleError, LlavaJsonDataset
from factory.errors import FactoryError

logger = logging.getLogger(__name__)

SHOWN = 20           # faults quoted in the message; the file holds them all
CHUNK = 512          # samples per round: images of a chunk decode on the pool while its text is tokenized
KINDS = {"image": "unreadable image", "text": "text that cannot be tokenized", "too_long": "over-length sample"}
PLURALS = {"image": "unreadable images", "text": "texts that cannot be tokenized", "too_long": "over-length samples"}


@dataclass
class Fault:
    index: int
    kind: str      # "image" | "text" | "too_long"
    message: str   # names file, entry and id

    def line(self) -> str:
        return f"[{KINDS[self.kind]}] {self.message}"


def scan(dataset: LlavaJsonDataset, workers: Optional[int] = None, progress: bool = True) -> List[Fault]:
    """Every fault of `dataset`, in index order."""
    from tqdm.auto import tqdm

    workers = workers or min(16, os.cpu_count() or 1)
    faults: List[Fault] = []
    bar = tqdm(total=len(dataset), desc=f"verify {Path(dataset.json_path).name}", unit="sample",
               disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(dataset), CHUNK):
            indices = range(start, min(start + CHUNK, len(dataset)))
            images = {i: pool.submit(_image_fault, dataset, i) for i in indices if dataset.has_image[i]}
            for i in indices:
                fault = _text_fault(dataset, i) or (images[i].result() if i in images else None)
                if fault is not None:
                    faults.append(fault)
                bar.update(1)
    bar.close()
    return faults


def _text_fault(dataset: LlavaJsonDataset, index: int) -> Optional[Fault]:
    try:
        encoded = dataset.tokenize(index)
    except BadSampleError as err:
        return Fault(index, "text", str(err))
    if encoded.truncated_image:
        return Fault(index, "too_long", f"{dataset.describe(index)}: with max_length={dataset.max_length} the "
                                        f"truncation would cut its image span; the run skips it")
    return None


def _image_fault(dataset: LlavaJsonDataset, index: int) -> Optional[Fault]:
    try:
        dataset.open_image(index)
    except FactoryError as err:
        return Fault(index, "image", str(err))
    return None


def summary(faults: List[Fault], dataset: LlavaJsonDataset, seconds: float, report: Optional[Path]) -> str:
    numbers = {kind: sum(f.kind == kind for f in faults) for kind in KINDS}
    counts = ", ".join(f"{n} {KINDS[kind] if n == 1 else PLURALS[kind]}" for kind, n in numbers.items() if n)
    counts = counts or "no faults"
    lines = [f"data.verify_images: {len(dataset)} samples of {dataset.json_path} checked in {seconds:.1f} s: "
             f"{counts}."]
    lines += [f"  - {fault.line()}" for fault in faults[:SHOWN]]
    if len(faults) > SHOWN:
        lines.append(f"  ... and {len(faults) - SHOWN} more")
    if report is not None:
        lines.append(f"The full list is in {report}.")
    return "\n".join(lines)


def verify_dataset(dataset: LlavaJsonDataset, run_dir: Optional[Path], stage: str,
                   workers: Optional[int] = None) -> List[Fault]:
    """Scan (rank 0), share the result with every rank, then raise or mark the bad samples (see the module doc)."""
    from factory.train.distributed import barrier, broadcast_object

    import torch

    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    text, faults = None, []
    if is_main:
        started = time.time()
        faults = scan(dataset, workers)
        report = None
        if faults and run_dir is not None:
            report = Path(run_dir) / f"data_faults_{stage}.txt"
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text("".join(fault.line() + "\n" for fault in faults))
        text = summary(faults, dataset, time.time() - started, report)
    barrier()
    text, faults = broadcast_object((text, faults))
    bad = [fault for fault in faults if fault.kind != "too_long"]
    if bad and dataset.on_bad_sample == "error":
        raise FactoryError(f"{text}\nFix or remove these samples, or set data.on_bad_sample=skip to train "
                           f"without them (data.on_bad_sample=error stops at the first one).")
    if bad and len(bad) > dataset.max_bad_fraction * len(dataset):
        raise FactoryError(f"{text}\n{len(bad)} of the {len(dataset)} samples are bad, more than "
                           f"data.max_bad_fraction={dataset.max_bad_fraction:g}: fix the data (or raise "
                           f"data.max_bad_fraction).")
    for fault in bad:
        dataset.mark_bad(fault.index, fault.message)
    if faults and is_main:
        logger.warning("%s\nThe bad samples are skipped (data.on_bad_sample=skip).", text)
    elif is_main:
        print(text, file=sys.stderr, flush=True)
    return faults
