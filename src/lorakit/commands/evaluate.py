"""`lorakit eval`: exact match and loss on a split, base model and adapter side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.argtypes import COPY_FIELDS_HELP, EXACT_4BIT_HELP, JSON_HELP, field_names


def register(commands) -> None:
    parser = commands.add_parser(
        "eval",
        help="score an adapter on a split: exact match and loss, against the base model (or image accuracy)",
        description="Generate an answer (greedy) for every example of a chat or prompt/completion JSONL file "
        "and score it: exact match with the reference (as parsed JSON objects when the reference is JSON) and "
        "the loss on the reference answers. Scores the base model (adapter off) and the adapter side by side, "
        "and prints a few examples, misses first. For an image-classification adapter, --data names an image "
        "set (fashion-mnist/test, digits/test, faces/test): top-1 and per-class accuracy, and the confusion "
        "matrix as a PNG beside the adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--adapter", type=Path,
                        help="adapter directory (none: score the base model alone, e.g. a merged one)")
    parser.add_argument("--data", type=Path, default=Path("data/orders/test.jsonl"),
                        help="JSONL split to score, or an image set such as fashion-mnist/test")
    parser.add_argument("--base", help="base model: a model directory, a .gguf file, or smollm2 (the embedded "
                        "default, used when --base is left out); leave it out for a fully fine-tuned --adapter")
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts generated together")
    parser.add_argument("--examples", type=int, default=3, help="examples to print")
    parser.add_argument("--no-base", action="store_true", help="score the adapter only")
    parser.add_argument("--unmerged", action="store_true",
                        help="score the adapter computed beside the base layers, as trained, instead of merged into "
                        "them (for a 4-bit QA-LoRA adapter the merge rounds the shifted mins to float16)")
    parser.add_argument("--exact-4bit", action="store_true", help=EXACT_4BIT_HELP)
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32",
                        help="dtype of the matrix products (autocast; the weights stay as loaded): float32 is the "
                        "exact reference; auto is bfloat16 where the device multiplies it natively (scoring ~2x "
                        "faster on such a CPU, e.g. for an adapter trained with compute_dtype: auto) and float32 "
                        "elsewhere")
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.add_argument("--copy-fields", type=field_names, metavar="KEYS",
                        help=COPY_FIELDS_HELP + " (the reference answers are then tokenized as such training reads "
                        "them, for the loss)")
    parser.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    from lorakit.data.records import read_records
    from lorakit.errors import ConfigError
    from lorakit.evaluation.evaluate import (
        compare_base_and_adapter,
        report,
        score_model,
    )
    from lorakit.evaluation.images import is_image_data
    from lorakit.files.decoding import copy_fields_to_use
    from lorakit.methods.method import method_of_directory
    from lorakit.models.base import load_for_inference
    from lorakit.train.precision import compute_context, resolved_compute_dtype

    if args.limit is not None and args.limit < 1 or args.batch_size < 1:
        raise ConfigError("--limit and --batch-size must be at least 1")
    if is_image_data(str(args.data)):
        return _eval_images(args)
    args.copy_fields = copy_fields_to_use(args.copy_fields, args.adapter)
    model, tokenizer = load_for_inference(args.base, args.adapter, exact_4bit=args.exact_4bit)
    device = next(model.parameters()).device
    products = resolved_compute_dtype(args.compute_dtype, device)
    whole_model = args.adapter is not None and method_of_directory(args.adapter).name == "full"
    with compute_context(products, device)():
        if args.adapter is None or whole_model:  # a fully fine-tuned model has no base inside it to compare with
            records = read_records(args.data)[:args.limit]
            scores = [score_model(model, tokenizer, records, "model", args.batch_size, progress=True,
                                  json_object=args.json, copy_fields=args.copy_fields)]
            shown = sorted(range(len(records)), key=lambda i: scores[0].correct[i])[:args.examples]
        else:
            records, scores, shown = compare_base_and_adapter(
                model, tokenizer, args.data, args.limit, args.batch_size, with_base=not args.no_base,
                examples=args.examples, progress=True, merged=not args.unmerged, json_object=args.json,
                copy_fields=args.copy_fields)
    print(report(args.data, records, scores, shown, products))
    return 0


def _eval_images(args: argparse.Namespace) -> int:
    import torch

    from lorakit.data.images import image_set
    from lorakit.errors import ConfigError
    from lorakit.evaluation.images import (
        evaluate_images,
        load_image_adapter,
        plot_confusion,
    )

    if args.adapter is None:
        raise ConfigError("scoring an image set needs --adapter (an image-classification adapter)")
    model, task = load_image_adapter(args.adapter)
    data = image_set(str(args.data))
    if list(data.classes) != task["classes"]:
        raise ConfigError(f"{args.data} has classes {list(data.classes)}, but the adapter was trained on "
                          f"{task['classes']}")
    if args.limit is not None:
        data = type(data)(data.images[:args.limit], data.labels[:args.limit], data.classes, data.name)
    device = next(model.parameters()).device
    with torch.no_grad():
        score = evaluate_images(model, data, task["image_size"], args.batch_size * 4, device)
    picture = plot_confusion(score, args.adapter / f"confusion-{str(args.data).replace('/', '-')}.png",
                             f"{args.adapter.name} on {args.data}")
    print(f"{args.data}: {len(data):,} images at {task['image_size']} px")
    print(f"top-1 accuracy  {100 * score.accuracy:.2f}%   loss {score.loss:.4f}")
    width = max(len(c) for c in data.classes)
    for name, accuracy, count in zip(data.classes, score.per_class(), score.confusion.sum(dim=1).tolist(),
                                     strict=True):
        print(f"  {name:<{width}}  {100 * accuracy:6.2f}%  of {count}")
    if picture is not None:
        print(f"confusion matrix: {picture}")
    return 0
