"""`--task retrieval`: CLIP/SigLIP image-text retrieval, recall@1/5/10 in both directions, exact vs FNA attention.

One dataset row per image; its caption column holds one caption or a list of captions (COCO and Flickr30k have
five). Image-to-text: a hit when any caption of the image ranks within the top K; text-to-image: when the caption's
own image does. Captions are embedded once (the text tower always runs exact attention). Agreement: the mean
cosine between the image embeddings of the two variants, and the share of queries whose top-ranked candidate is the
same under both.
"""

from __future__ import annotations

import torch

from ... import metrics
from ...errors import InputError
from ...tools.pipeline import EXACT, FNA, VARIANTS
from ..data import TaskData, task_data
from ..inputs import ImageCollate
from ..report import TaskOutcome, mean_cosine, top1_agreement
from ..runner import Runner
from ..settings import EvalSettings
from .zero_shot import image_embeddings, text_embeddings

MODEL_KIND = "dual_encoder"
CAPTION_COLUMNS = ("caption", "captions", "text", "sentences")
K_VALUES = (1, 5, 10)


def retrieval_recalls(similarity: torch.Tensor, image_of_text: list[int], k: tuple[int, ...] = K_VALUES) -> dict:
    """Recall@K in both directions from an `[images, texts]` similarity matrix.

    `image_of_text[t]` is the image that text `t` describes. Returns `{"i2t_recall@K": ..., "t2i_recall@K": ...}`.
    """
    recall = metrics.load("recall_at_k")
    captions_of = [[] for _ in range(similarity.shape[0])]
    for text, image in enumerate(image_of_text):
        captions_of[image].append(text)
    i2t = similarity.topk(min(max(k), similarity.shape[1]), dim=1).indices
    t2i = similarity.T.topk(min(max(k), similarity.shape[0]), dim=1).indices
    out = {}
    for name, ranked, relevant in (("i2t", i2t, captions_of), ("t2i", t2i, [[i] for i in image_of_text])):
        values = recall.compute(predictions=ranked.tolist(), references=relevant, k=list(k))
        out.update({f"{name}_{key}": value for key, value in values.items()})
    return out


def load_data(settings: EvalSettings) -> TaskData:
    """The evaluated split and its columns; `extra` holds the flat caption list and the image of each caption."""
    data = task_data(
        settings, {"image": settings.image_column or "image", "caption": settings.caption_column or CAPTION_COLUMNS}
    )
    texts, image_of_text = [], []
    for image_index, captions in enumerate(data.test[data.columns["caption"]]):
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise InputError(
                f"column {data.columns['caption']!r} must hold a caption or a list of captions per image; "
                f"row {image_index} holds {captions!r}"
            )
        texts += captions
        image_of_text += [image_index] * len(captions)
    data.extra.update(texts=texts, image_of_text=image_of_text)
    return data


def run_task(runner: Runner, data: TaskData) -> TaskOutcome:
    """Recall@K of both variants in both directions; the captions are embedded once, with exact attention."""
    settings, columns, test = runner.settings, data.columns, data.test
    texts, image_of_text = data.extra["texts"], data.extra["image_of_text"]
    caption_embeddings = text_embeddings(runner, texts)

    collate = ImageCollate(runner.processor, columns["image"], settings.image_size)
    comparison = runner.compare(test, collate, image_embeddings, description="retrieval: images")
    outputs = comparison.outputs
    similarity = {v: outputs[f"{v}.embeddings"] @ caption_embeddings.cpu().T for v in VARIANTS}
    scores = {v: retrieval_recalls(similarity[v], image_of_text) for v in VARIANTS}
    agreement = {
        "embedding_cosine": mean_cosine(outputs[f"{EXACT}.embeddings"], outputs[f"{FNA}.embeddings"]),
        "i2t_top1_agreement": top1_agreement(similarity[EXACT], similarity[FNA]),
        "t2i_top1_agreement": top1_agreement(similarity[EXACT].T, similarity[FNA].T),
    }
    return TaskOutcome(scores, agreement, comparison, {"images": len(test), "captions": len(texts)})
