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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from factory.data.llava_json import BadSampleError, LlavaJsonDataset, data_options
from factory.data.templates import get_template
from factory.distributed import barrier, broadcast_object
from factory.errors import FactoryError
from factory.stages import plan_stages

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
    workers = workers or min(16, os.cpu_count() or 1)
    faults: List[Fault] = []
    bar = tqdm(total=len(dataset), desc=f"verify {Path(dataset.json_path).name}", unit="sample",
               disable=not progress, dynamic_ncols=True)
    starts = list(range(0, len(dataset), CHUNK))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(start: int) -> Dict[int, Any]:
            return {i: pool.submit(_image_fault, dataset, i)
                    for i in range(start, min(start + CHUNK, len(dataset))) if dataset.has_image[i]}

        upcoming = submit(starts[0]) if starts else {}
        for number, start in enumerate(starts):
            # the next chunk's images decode while this chunk's text is tokenized in this thread
            images, upcoming = upcoming, (submit(starts[number + 1]) if number + 1 < len(starts) else {})
            for i in range(start, min(start + CHUNK, len(dataset))):
                # a sample can have both kinds of fault: list both, so one pass finds everything
                found = [_text_fault(dataset, i), images[i].result() if i in images else None]
                faults.extend(fault for fault in found if fault is not None)
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
    """Scan one dataset (rank 0), share the result with every rank, then raise or mark its bad samples."""
    return verify_datasets([(stage, dataset)], run_dir, workers)[0]


def verify_datasets(named: Sequence[Tuple[str, LlavaJsonDataset]], run_dir: Optional[Path],
                    workers: Optional[int] = None) -> List[List[Fault]]:
    """`verify_dataset` for several (stage, dataset) pairs: every fault of every dataset is listed in one error."""
    is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    results: List[Tuple[Optional[str], List[Fault]]] = []
    if is_main:
        for stage, dataset in named:
            started = time.time()
            faults = scan(dataset, workers)
            report = None
            if faults and run_dir is not None:
                report = Path(run_dir) / f"data_faults_{stage}.txt"
                report.parent.mkdir(parents=True, exist_ok=True)
                report.write_text("".join(fault.line() + "\n" for fault in faults))
            results.append((summary(faults, dataset, time.time() - started, report), faults))
    barrier()
    results = broadcast_object(results)
    problems = []
    for (_, dataset), (text, faults) in zip(named, results):
        bad = {fault.index for fault in faults if fault.kind != "too_long"}  # samples, not faults
        if bad and dataset.on_bad_sample == "error":
            problems.append(f"{text}\nFix or remove these samples, or set data.on_bad_sample=skip to train "
                            f"without them (data.on_bad_sample=error stops at the first one).")
        elif bad and len(bad) > dataset.max_bad_fraction * len(dataset):
            problems.append(f"{text}\n{len(bad)} of the {len(dataset)} samples are bad, more than "
                            f"data.max_bad_fraction={dataset.max_bad_fraction:g}: fix the data (or raise "
                            f"data.max_bad_fraction).")
    if problems:
        raise FactoryError("\n".join(problems))
    for (_, dataset), (text, faults) in zip(named, results):
        for fault in faults:
            if fault.kind != "too_long":
                dataset.mark_bad(fault.index, fault.message)
        if faults and is_main:
            logger.warning("%s\nThe bad samples are skipped (data.on_bad_sample=skip).", text)
        elif is_main:
            print(text, file=sys.stderr, flush=True)
    return [faults for _, faults in results]


# Per process: what a run's first stage found in the data of its later stages, so they are not scanned twice.
_FOUND: Dict[tuple, List[Fault]] = {}


def _identity(dataset: LlavaJsonDataset, run_dir: Path) -> tuple:
    """What decides a dataset's faults: the file (path, size, mtime), its images and the text settings."""
    stat = os.stat(dataset.json_path)
    return (str(run_dir), os.path.abspath(dataset.json_path), stat.st_size, stat.st_mtime_ns, dataset.image_folder,
            getattr(dataset.template, "name", type(dataset.template).__name__), dataset.max_length,
            dataset.num_image_tokens, dataset.max_aspect_ratio, dataset.allow_outside_paths,
            getattr(dataset, "image_first", True))


def verify_run_data(cfg, spec, dataset: LlavaJsonDataset, run_dir: Path) -> None:
    """data.verify_images in a run. The first stage that trains scans its own data *and* that of every later stage
    of the run (same tokenizer, image tokens and transform; each stage's template), so a bad stage-2 sample stops the
    run before stage 1 spends hours; a later stage reuses what was found and only marks its bad samples."""
    key = _identity(dataset, run_dir)
    if key in _FOUND:
        for fault in _FOUND[key]:
            if fault.kind != "too_long":
                dataset.mark_bad(fault.index, fault.message)
        return
    stages = plan_stages(cfg)
    later = stages[[s.name for s in stages].index(spec.name) + 1:]
    named = [(spec.name, dataset)] + [(s.name, LlavaJsonDataset(
        json_path=str(s.data.json), image_folder=str(s.data.get("image_folder") or ""), tokenizer=dataset.tokenizer,
        template=get_template(s.template), image_transform=dataset.image_transform,
        num_image_tokens=dataset.num_image_tokens, max_length=dataset.max_length,
        image_first=getattr(dataset, "image_first", True), **data_options(cfg.data))) for s in later]
    for (_, checked), faults in zip(named, verify_datasets(named, run_dir)):
        _FOUND[_identity(checked, run_dir)] = faults
