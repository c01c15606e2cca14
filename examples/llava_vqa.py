"""LLaVA visual question answering with FNA in the vision tower (the language model stays exact).

First one question through the plain Transformers path (`attn_implementation={"vision_config": "fna",
"text_config": "sdpa"}`, settings from `FNAConfig.apply`), then the evaluation API (task "vqa") on `--limit`
questions: exact and FNA answers to the same prompts, exact match / VQA accuracy and their agreement.

    python examples/llava_vqa.py --smoke         # offline: tiny random LLaVA, a few easy-vqa questions
    python examples/llava_vqa.py --model llava-hf/llava-1.5-7b-hf --dataset lmms-lab/VQAv2 --split validation \\
        --limit 200 --layers 12: --num-landmarks 64 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import hf_fna
from hf_fna import assets
from hf_fna.evaluation import EvalSettings, run_evaluation
from hf_fna.evaluation.data import load_split, to_rgb
from hf_fna.evaluation.tasks.vqa import ANSWER_COLUMNS, QUESTION_COLUMNS, answer_list
from hf_fna.evaluation.tiny_models import build_tiny_llava, vocabulary

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def column(row: dict, candidates: tuple[str, ...]) -> str:
    return next(name for name in candidates if name in row)


def ask(model_path: str, fna_config: hf_fna.FNAConfig, row: dict, dtype: torch.dtype, max_new_tokens: int) -> dict:
    """One question with FNA in the vision tower, loaded the way a user would; returns the answer and landmarks."""
    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(
        model_path, attn_implementation={"vision_config": "fna", "text_config": "sdpa"}, dtype=dtype
    )
    fna_config.apply(model)  # the settings go to the vision tower's config; the language model keeps sdpa
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    content = [{"type": "image"}, {"type": "text", "text": row[column(row, QUESTION_COLUMNS)]}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=to_rgb(row["image"]), text=prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    landmarks = hf_fna.last_landmarks(model)  # None would mean FNA never ran
    return {"answer": answer, "landmarks": None if landmarks is None else list(landmarks.shape)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-hf/llava-1.5-7b-hf", help="LLaVA-style model: Hub id or folder")
    parser.add_argument("--dataset", default="lmms-lab/VQAv2", help="Hub dataset, folder or hf_fna:easy_vqa")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=200, help="questions, drawn with a fixed seed")
    parser.add_argument("--layers", default="auto", help="FNAConfig.layers of the vision tower")
    parser.add_argument("--num-landmarks", type=int, default=64, help="FNAConfig.num_landmarks")
    parser.add_argument("--min-tokens", type=int, default=0, help="FNAConfig.min_tokens (LLaVA-1.5: 577 tokens)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--mixed-precision", default="no", choices=list(DTYPES))
    parser.add_argument("--smoke", action="store_true", help="tiny random LLaVA and easy-vqa questions, offline")
    args = parser.parse_args(argv)
    fna_config = hf_fna.FNAConfig(layers=args.layers, num_landmarks=args.num_landmarks, min_tokens=args.min_tokens)

    with contextlib.ExitStack() as stack:
        if args.smoke:  # random weights: the answers are gibberish, exact and FNA agreeing on them is the point
            data = assets.easy_vqa("test").shuffle(seed=0).select(range(8))
            words = vocabulary([*data["question"], *data.features["label"].names])
            args.model = build_tiny_llava(stack.enter_context(tempfile.TemporaryDirectory()), words)
            args.batch_size, args.max_new_tokens = 4, 3
            fna_config = hf_fna.FNAConfig(layers="all", num_landmarks=16, min_tokens=0)
        else:
            data = load_split(args.dataset, args.split, args.limit, seed=0)
        row = data[0]
        demo = ask(args.model, fna_config, row, DTYPES[args.mixed_precision], args.max_new_tokens)
        question, answers = row[column(row, QUESTION_COLUMNS)], answer_list(row[column(row, ANSWER_COLUMNS)])
        print(f"Q: {question}\nA (FNA vision tower): {demo['answer']!r}; reference: {answers[:3]}; "
              f"landmarks {demo['landmarks']}\n")  # fmt: skip

        settings = EvalSettings(
            task="vqa",
            model=args.model,
            dataset=data,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            mixed_precision=args.mixed_precision,
            fna_config=fna_config,
            show_progress=not args.smoke,
        )
        result = run_evaluation(settings)
    return {
        "demo": demo,
        "metrics": result.metrics,
        "agreement": result.agreement,
        "speedup": result.throughput["speedup"],
        "num_samples": result.num_samples,
        "tokens_per_image": result.settings["tokens_per_image"],
        "notes": result.notes,
        "examples": result.details["examples"],
    }


if __name__ == "__main__":
    main()
