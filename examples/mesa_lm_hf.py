"""A MesaNet-style hybrid language model trained on packed documents with the Hugging Face ``Trainer``.

The documents are the documentation topics that ship with CPython (``pydoc_data.topics``, always installed), cut into
pieces of at most 512 bytes, as UTF-8 bytes (vocabulary 256); a tenth of the topics are held out.
``transformers.DataCollatorWithFlattening`` packs each batch of documents into one row without padding, with
``position_ids`` that restart at 0 in every document; ``mesa_module.hf.MesaForCausalLM`` reads those as document
boundaries, so no layer sees across one: mesa states and short convolutions restart, softmax attention stays inside
each document, rotary positions restart. The model alternates gated mesa layers (MesaNet's:
input and forget gates, short convolution, gated output norm) with softmax layers.

The script trains with the ``Trainer`` (AdamW that keeps norms, biases and the mesa regulariser out of weight decay,
warm-up and cosine decay), evaluates on held-out documents packed the same way, samples a continuation with
``model.generate()``, checks that greedy ``generate()`` picks the argmax of one full forward pass at every step, and
saves the model with ``save_pretrained`` and loads it back with ``AutoModelForCausalLM.from_pretrained``.

    python examples/mesa_lm_hf.py                     # defaults: 2.3 minutes of CPU time, one thread
    python examples/mesa_lm_hf.py --steps 1000 --d-model 256 --activation-checkpointing
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from mesa_module.hf import MesaConfig, MesaForCausalLM

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mesa_training import learning_rate_factor, make_optimizer  # noqa: E402

logger = logging.getLogger("mesa_lm_hf")


def load_documents(max_bytes: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Training and held-out documents: every CPython documentation topic cut into pieces of at most ``max_bytes``.

    A tenth of the topics, drawn with ``seed``, are held out whole, so no held-out text is seen in training.
    """
    from pydoc_data.topics import topics

    keys = sorted(key for key in topics if topics[key].strip())
    random.Random(seed).shuffle(keys)
    n_eval = max(1, len(keys) // 10)

    def pieces(keys):
        data = [topics[key].encode("utf-8") for key in keys]
        return [list(text[i : i + max_bytes]) for text in data for i in range(0, len(text), max_bytes)]

    return pieces(keys[n_eval:]), pieces(keys[:n_eval])


@dataclass
class Report:
    """What :func:`main` returns."""

    model: MesaForCausalLM
    train_loss: float
    eval_loss: float
    train_tokens_per_s: float
    sample: str
    greedy_matches_forward: bool
    reloaded_max_diff: float


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps")
    parser.add_argument("--docs-per-step", type=int, default=4, help="documents packed into each step's row")
    parser.add_argument("--max-doc-bytes", type=int, default=512, help="longest document; topics are cut into pieces")
    parser.add_argument("--d-model", type=int, default=128, help="residual width")
    parser.add_argument("--layers", type=int, default=4, help="blocks: mesa, softmax, mesa, softmax, ...")
    parser.add_argument("--heads", type=int, default=4, help="heads per attention layer")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=15, help="warm-up steps")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in the backward")
    parser.add_argument("--sample-tokens", type=int, default=160, help="bytes to generate")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, shuffling and sampling seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/mesa_lm_hf"), help="Trainer and save_pretrained folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()

    train_docs, eval_docs = load_documents(args.max_doc_bytes, args.seed)
    logger.info("%d training and %d held-out documents (pydoc_data.topics)", len(train_docs), len(eval_docs))

    torch.manual_seed(args.seed)
    kinds = ["mesa" if i % 2 == 0 else "softmax" for i in range(args.layers)]
    config = MesaConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, attention=kinds)
    model = MesaForCausalLM(config)
    logger.info("MesaForCausalLM %s, %d parameters", "-".join(k[0].upper() for k in kinds), model.num_parameters())

    optimizer = make_optimizer(model, lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, warmup=args.warmup, steps=args.steps)
    )
    training = transformers.TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,
        per_device_train_batch_size=args.docs_per_step,
        per_device_eval_batch_size=args.docs_per_step,
        max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
        activation_checkpointing=args.activation_checkpointing,
        include_num_input_tokens_seen=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=training,
        train_dataset=[{"input_ids": doc} for doc in train_docs],
        eval_dataset=[{"input_ids": doc} for doc in eval_docs],
        data_collator=transformers.DataCollatorWithFlattening(),
        optimizers=(optimizer, schedule),
    )
    result = trainer.train()
    train_seconds = result.metrics["train_runtime"]
    eval_loss = trainer.evaluate()["eval_loss"]
    model.eval()

    prompt = torch.tensor([eval_docs[0][:48]])
    torch.manual_seed(args.seed)
    sampled = model.generate(prompt, max_new_tokens=args.sample_tokens, do_sample=True, temperature=0.8, top_k=40)
    sample = bytes(sampled[0, prompt.shape[1] :].tolist()).decode("utf-8", errors="replace")
    greedy = model.generate(prompt, max_new_tokens=32, do_sample=False)
    with torch.no_grad():
        full_argmax = model(greedy[:, :-1]).logits[:, prompt.shape[1] - 1 :].argmax(-1)
    greedy_matches = torch.equal(full_argmax, greedy[:, prompt.shape[1] :])

    model.save_pretrained(args.out / "model")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(args.out / "model").eval()
    with torch.no_grad():
        reloaded_diff = (reloaded(greedy).logits - model(greedy).logits).abs().max().item()

    report = Report(
        model=model,
        train_loss=result.training_loss,
        eval_loss=eval_loss,
        train_tokens_per_s=trainer.state.num_input_tokens_seen / max(train_seconds, 1e-9),
        sample=sample,
        greedy_matches_forward=greedy_matches,
        reloaded_max_diff=reloaded_diff,
    )
    print(f"\n{args.steps} steps x {args.docs_per_step} packed documents, {torch.get_num_threads()} CPU thread(s)")
    print(
        "| train loss | held-out loss | held-out bits/byte | train tokens/s | greedy = forward argmax | reload diff |"
    )
    print("|---:|---:|---:|---:|---|---:|")
    print(
        f"| {report.train_loss:.3f} | {eval_loss:.3f} | {eval_loss / math.log(2):.3f} | "
        f"{report.train_tokens_per_s:,.0f} | {greedy_matches} | {reloaded_diff:.1e} |"
    )
    print(f"\nPrompt: {bytes(prompt[0].tolist()).decode('utf-8', errors='replace')!r}\nSample: {sample!r}")
    print(f"\nsaved: {args.out / 'model'}; wall time {time.perf_counter() - start:.0f} s")
    return report


if __name__ == "__main__":
    main()
