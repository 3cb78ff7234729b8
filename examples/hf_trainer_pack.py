"""A learning-rate sweep of tiny BERT classifiers trained as ONE pack by a transformers.Trainer.

Six ``BertForSequenceClassification`` models built from one small config (each its own initial
weights) train together in one ``PackedHFTrainer``: each member has its own learning rate, AdamW
state, warmup and linear schedule and gradient clipping, so member ``i`` ends as a plain
``transformers.Trainer`` run with ``learning_rate=lrs[i]`` would. The task is synthetic: does a
sentence contain the "positive" token? Every member's eval loss and accuracy are reported, and
each member is saved as a normal ``save_pretrained`` folder that ``from_pretrained`` loads.

Run from the repository root after ``pip install -e ".[dev]"`` (about 15 s on 2 CPU cores):
    python examples/hf_trainer_pack.py
    python examples/hf_trainer_pack.py --epochs 3 --output-dir /tmp/bert-pack
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
import transformers

from modelbatch.hf_trainer import PackedHFTrainer

VOCAB, SEQ, POSITIVE = 64, 12, 7
LEARNING_RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def sentences(count: int, seed: int) -> list[dict[str, torch.Tensor | int]]:
    """Token-id sentences of random length; the label says whether POSITIVE occurs in it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (count, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (count,), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    labels = torch.randint(0, 2, (count,), generator=g)
    where = (torch.rand(count, generator=g) * (lengths - 1)).long()
    ids[labels == 1, where[labels == 1]] = POSITIVE
    return [
        {"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "labels": int(labels[i])}
        for i in range(count)
    ]


def accuracy(prediction: transformers.EvalPrediction) -> dict[str, float]:
    """Called once per member, with that member's logits."""
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--output-dir", default=None, help="where the members are saved (default: a temp dir)"
    )
    args = parser.parse_args()
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hf-pack-")
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bars, one per member

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=SEQ, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    models = [transformers.BertForSequenceClassification(config) for _ in LEARNING_RATES]
    training = transformers.TrainingArguments(
        output_dir=output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=64, warmup_steps=5, max_grad_norm=1.0, eval_strategy="epoch",
        logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = PackedHFTrainer(
        models,
        training,
        learning_rate=LEARNING_RATES,
        train_dataset=sentences(512, seed=1),
        eval_dataset=sentences(256, seed=2),
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()

    print(f"{len(models)} BERT members trained as one pack for {args.epochs} epochs")
    for i, lr in enumerate(LEARNING_RATES):
        print(
            f"  member {i}  lr={lr:<7g} eval_loss={metrics[f'eval_loss/m{i}']:.4f}  "
            f"accuracy={metrics[f'eval_accuracy/m{i}']:.3f}"
        )
    best = min(range(len(models)), key=lambda i: metrics[f"eval_loss/m{i}"])
    folders = trainer.save_members(output_dir)
    print(f"best member {best} (lr={LEARNING_RATES[best]:g}); every member saved with save_pretrained:")
    print(f"  BertForSequenceClassification.from_pretrained({folders[best]!r})")


if __name__ == "__main__":
    main()
