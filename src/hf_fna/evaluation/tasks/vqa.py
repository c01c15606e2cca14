"""`--task vqa`: LLaVA-style models answer questions about images, exact vs FNA attention in the vision tower.

Prompts go through the processor's chat template (a user turn with the image and the question, then the generation
prompt); answers are generated greedily. Metrics (the bundled `vqa_accuracy` module, after the standard VQA answer
normalisation): VQA accuracy when questions carry several human answers (VQAv2: 10), and exact match (always; the
headline for single-answer datasets such as easy-vqa, where VQA accuracy is undefined). Agreement: the share of
questions where both variants give the same normalised answer. Throughput counts whole generations, so the
language model (always exact) dilutes the vision tower's speed-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ... import metrics
from ...errors import InputError
from ...tools.pipeline import EXACT, FNA, VARIANTS
from ..data import TaskData, task_data, to_rgb
from ..report import TaskOutcome
from ..runner import Runner
from ..settings import EvalSettings

MODEL_KIND = "generator"
QUESTION_COLUMNS = ("question", "query")
ANSWER_COLUMNS = ("answers", "answer", "multiple_choice_answer")


def answer_list(value: Any) -> list[str]:
    """The reference answers of one question, from the common layouts: a string, a list of strings, a list of
    `{"answer": ...}` dicts (VQAv2), or a dict of lists with an "answer" key."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("answer"), list):
        return [str(a) for a in value["answer"]]
    if isinstance(value, (list, tuple)):
        return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in value]
    raise InputError(f"cannot read reference answers from {value!r}")


@dataclass
class VQACollate:
    """Rows with an image, a question and answers -> (processor inputs of chat-template prompts, `{"answers"}`)."""

    processor: Any
    image_column: str
    question_column: str
    answer_column: str

    def __call__(self, rows: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row[self.question_column]}]}]
            for row in rows
        ]
        prompts = [self.processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        images = [to_rgb(row[self.image_column]) for row in rows]
        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        return dict(inputs), {"answers": [answer_list(row[self.answer_column]) for row in rows]}


@dataclass
class GenerateAnswers:
    """Greedy generation; returns the decoded new tokens of each prompt."""

    processor: Any
    max_new_tokens: int

    def __call__(self, model: Any, inputs: dict) -> dict:
        generated = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        return {"answer": [a.strip() for a in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]}


def load_data(settings: EvalSettings) -> TaskData:
    if settings.image_size is not None:
        raise InputError("--image-size is not supported by --task vqa: the model's processor sets the resolution")
    return task_data(
        settings,
        {
            "image": settings.image_column or "image",
            "question": settings.question_column or QUESTION_COLUMNS,
            "answer": settings.answer_column or ANSWER_COLUMNS,
        },
    )


def run_task(runner: Runner, data: TaskData) -> TaskOutcome:
    """Generated answers of both variants, VQA accuracy and exact match, and their answer agreement."""
    settings, columns, test = runner.settings, data.columns, data.test
    if not getattr(runner.processor, "chat_template", None):
        raise InputError(f"{settings.model!r} has no chat template in its processor; vqa prompts need one")
    runner.processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at the same place
    collate = VQACollate(runner.processor, columns["image"], columns["question"], columns["answer"])
    comparison = runner.compare(
        test, collate, GenerateAnswers(runner.processor, settings.max_new_tokens), description="vqa"
    )
    outputs = comparison.outputs
    metric = metrics.load("vqa_accuracy")
    single_answer = all(len(answers) == 1 for answers in outputs["answers"])
    scores = {}
    for variant in VARIANTS:
        result = metric.compute(predictions=outputs[f"{variant}.answer"], references=outputs["answers"])
        scores[variant] = {"exact_match": result["exact_match"]} if single_answer else result
    same = metric.compute(predictions=outputs[f"{FNA}.answer"], references=[[a] for a in outputs[f"{EXACT}.answer"]])
    examples = [
        {"answers": outputs["answers"][i], **{v: outputs[f"{v}.answer"][i] for v in VARIANTS}}
        for i in range(min(5, comparison.num_samples))
    ]
    details = {"single_answer_dataset": single_answer, "examples": examples}
    return TaskOutcome(scores, {"answer_agreement": same["exact_match"]}, comparison, details)
