"""See what the model trains on: tokenize every entry of a LLaVA data file exactly as training does.

    python -m factory.data.inspect DATA_FILE --template NAME --tokenizer DIR_OR_ID [--num-image-tokens N] [--json]

Each entry goes through the training loader's own steps (`read_entries`, `entry_problem`, then `encode_entry`:
the text check and image first unless --keep-image-placement, the template's pieces, `max_length` truncation when
--max-length is given) with the tokenizer loaded the way training loads it; no image is opened. The text output
shows every token as its vocabulary piece (so the SentencePiece space piece ``▁`` and ``<0x0A>`` are visible), the
image span as ``<image>×N`` and the trained spans between ``[[`` and ``]]``. With --json, one object per line:
``{"id", "input_ids", "labels"}`` (image positions as -200, untrained labels as -100) or ``{"id", "error"}`` for an
entry the loader rejects. Exit status: 0 when every entry encodes, 1 when some entry is rejected, 2 when the file,
template or tokenizer cannot be used at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Iterator, List, Optional

from factory.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from factory.data.llava_json import (BadSampleError, encode_entry, entry_problem, read_entries,
                                      rejected_entry_message)
from factory.data.templates import Template, get_template
from factory.errors import FactoryError
from factory.model.llms import load_tokenizer

# LLaVA-1.5's CLIP ViT-L/14-336 gives 576 image tokens; pass the encoder's count to see exact lengths.
DEFAULT_IMAGE_TOKENS = 576


def inspect_entries(json_path: str, template: Template, tokenizer, num_image_tokens: int = DEFAULT_IMAGE_TOKENS,
                    max_length: Optional[int] = None, image_first: bool = True) -> Iterator[Dict]:
    """One dict per entry of `json_path`, in file order: {id, where, input_ids, labels} or {id, where, error}."""
    for where, entry in read_entries(json_path):
        sample_id = entry.get("id") if isinstance(entry, dict) else None
        problem = entry_problem(entry)
        if problem:
            yield {"id": sample_id, "where": where, "error": rejected_entry_message(where, entry, problem)}
            continue
        try:  # training's own step: a lone surrogate or a tokenizer failure gets training's message
            sample = encode_entry(entry, where, template, tokenizer, num_image_tokens, max_length, image_first)
        except BadSampleError as err:
            yield {"id": sample_id, "where": where, "error": str(err)}
            continue
        if sample.truncated_image:
            yield {"id": sample_id, "where": where,
                   "error": f"{where}: max_length={max_length} cuts this entry's image span; training skips it."}
            continue
        yield {"id": sample_id, "where": where, "input_ids": sample.input_ids, "labels": sample.labels}


def render_tokens(tokenizer, input_ids: List[int], labels: List[int]) -> str:
    """Vocabulary pieces separated by spaces, the image span collapsed, trained spans inside [[ ]]."""
    out: List[str] = []
    trained = False
    i = 0
    while i < len(input_ids):
        token, label = input_ids[i], labels[i]
        if (label != IGNORE_INDEX) != trained:
            out.append("[[" if not trained else "]]")
            trained = not trained
        if token == IMAGE_TOKEN_INDEX:
            run = i
            while run < len(input_ids) and input_ids[run] == IMAGE_TOKEN_INDEX:
                run += 1
            out.append(f"<image>×{run - i}")
            i = run
            continue
        piece = tokenizer.convert_ids_to_tokens(int(token))
        out.append(json.dumps(piece, ensure_ascii=False)[1:-1] if piece is not None else f"<id {token}>")
        i += 1
    if trained:
        out.append("]]")
    return " ".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m factory.data.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("data_file", help="LLaVA data file (JSON list or JSONL)")
    parser.add_argument("--template", required=True, help="chat template name (plain, phi, vicuna_v1, ...)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id (as llm.tokenizer)")
    parser.add_argument("--num-image-tokens", type=int, default=DEFAULT_IMAGE_TOKENS,
                        help=f"image tokens per image (default {DEFAULT_IMAGE_TOKENS}, LLaVA-1.5's CLIP-L/336)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="truncate as training does with trainer.max_length (default: no truncation)")
    parser.add_argument("--keep-image-placement", action="store_true",
                        help="as data.image_first=false: keep <image> where the file put it")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        template = get_template(args.template)
        tokenizer = load_tokenizer({"tokenizer": args.tokenizer}, "pretrained", pad_with_unk=False)
        if args.num_image_tokens < 1:
            raise FactoryError(f"--num-image-tokens must be >= 1 (got {args.num_image_tokens}).")
        rows = inspect_entries(args.data_file, template, tokenizer, args.num_image_tokens, args.max_length,
                               image_first=not args.keep_image_placement)
        rejected = total = 0
        for row in rows:
            total += 1
            rejected += "error" in row
            if args.json:
                keys = ("id", "error") if "error" in row else ("id", "input_ids", "labels")
                print(json.dumps({key: row[key] for key in keys}, ensure_ascii=False))
                continue
            if "error" in row:
                print(f"== id {row['id']!r}: REJECTED\n{row['error']}\n")
                continue
            count = sum(label != IGNORE_INDEX for label in row["labels"])
            print(f"== id {row['id']!r} ({row['where']}): {len(row['input_ids'])} tokens, {count} trained")
            print(render_tokens(tokenizer, row["input_ids"], row["labels"]) + "\n")
        if not args.json:
            print(f"{total} entries, {total - rejected} encoded, {rejected} rejected (template {template.name!r}, "
                  f"{args.num_image_tokens} image tokens)")
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1 if rejected else 0


if __name__ == "__main__":
    sys.exit(main())
