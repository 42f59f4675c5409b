"""The tiny caption LM: a byte-level BPE tokenizer and a 2-layer Llama pre-trained on the caption corpus."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from synray.language.corpus import caption_vocabulary_texts
from synray.models.tiny_specs import (BOS, BUILD_THREADS, EOS, GENERATION_DEFAULTS, LLM_ARCH, LLM_VOCAB_SIZE,
                                      MAX_TRAIN_TOKENS, PAD, PROMPT_LOSS_WEIGHT, SPECIAL_TOKENS, TRAIN_BATCH_SIZE,
                                      TRAIN_LR, TRAIN_STEPS, default_corpus)

if TYPE_CHECKING:   # transformers is imported where a model is built: importing it costs seconds
    from transformers import PreTrainedTokenizerFast

def tokenizer_texts(docs: Sequence[str], builtin: bool) -> list[str]:
    """Texts to train a tokenizer on: the documents, plus every fixed prompt string if builtin."""
    if not builtin:
        return list(docs)
    return [*docs, *caption_vocabulary_texts()]


def split_document(doc: str) -> tuple[str, str]:
    """(prompt, completion): the completion is what follows the last `=>` of the document's last line."""
    body = doc.rstrip("\n")
    line_start = body.rfind("\n") + 1
    arrow = body.find("=>", line_start)
    if arrow < 0:
        arrow = body.rfind("=>", 0, line_start)
    if arrow < 0:
        return "", doc
    cut = arrow + 2
    return doc[:cut], doc[cut:]


def document_captions(docs: Sequence[str]) -> list[str]:
    """Every `input => caption` right-hand side in the documents (example lines and completions)."""
    out = []
    for doc in docs:
        for line in doc.splitlines():
            _, sep, rhs = line.partition("=>")
            if sep and rhs.strip():
                out.append(rhs.strip())
    return out or [d.strip() for d in docs if d.strip()]


def train_bpe(texts: Sequence[str], vocab_size: int, *, add_eos: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer trained on texts; it prepends BOS (and appends EOS if add_eos)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    single = f"{BOS} $A {EOS}" if add_eos else f"{BOS} $A"
    pair = f"{BOS} $A {EOS} $B {EOS}" if add_eos else f"{BOS} $A $B"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(BOS, bos_id), (EOS, eos_id)])
    return tok


def wrap_tokenizer(tok: Tokenizer, model_max_length: int, padding_side: str = "right") -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=model_max_length, padding_side=padding_side, clean_up_tokenization_spaces=False)


@contextlib.contextmanager
def deterministic_torch(seed: int, threads: int = BUILD_THREADS) -> Iterator[None]:
    """Seed torch, fix the thread count and use deterministic kernels; restore the caller's state after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(old_det)
            torch.set_num_threads(old_threads)


def _encode_documents(tok: Tokenizer, docs: Sequence[str]) -> list[tuple[list[int], list[float]]]:
    """Token ids and per-token loss weights: BOS + prompt + completion + EOS, prompt tokens down-weighted."""
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    prompts, completions = zip(*(split_document(d) for d in docs))
    p_enc = tok.encode_batch(list(prompts), add_special_tokens=False)
    c_enc = tok.encode_batch(list(completions), add_special_tokens=False)
    out = []
    for p, c in zip(p_enc, c_enc):
        ids = [bos_id] + p.ids + c.ids + [eos_id]
        weights = [PROMPT_LOSS_WEIGHT] * (1 + len(p.ids)) + [1.0] * (len(c.ids) + 1)
        out.append((ids[:MAX_TRAIN_TOKENS], weights[:MAX_TRAIN_TOKENS]))
    return out


def _batch(examples: Sequence[tuple[list[int], list[float]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    weight = torch.zeros((len(examples), width), dtype=torch.float32)
    for i, (row, w) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        weight[i, : len(w)] = torch.tensor(w)
    return ids, mask, weight


def _length_bucketed_batches(lengths: Sequence[int], batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled batches; each drawn from a window of 8 batches sorted by length (less padding)."""
    window = batch_size * 8
    while True:
        perm = torch.randperm(len(lengths), generator=gen).tolist()
        for start in range(0, len(perm), window):
            part = sorted(perm[start:start + window], key=lambda i: lengths[i])
            chunks = [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
            for k in torch.randperm(len(chunks), generator=gen).tolist():
                yield chunks[k]


def pretrain(model: Any, examples: Sequence[tuple[list[int], list[float]]], pad_id: int, *,
             steps: int, batch_size: int = TRAIN_BATCH_SIZE, lr: float = TRAIN_LR,
             seed: int = 0) -> list[float]:
    """A short AdamW run (warmup + cosine) of next-token loss weighted per token; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(20, steps // 10))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    batches = _length_bucketed_batches([len(ids) for ids, _ in examples], batch_size, gen)
    losses = []
    model.train()
    for _ in range(steps):
        ids, mask, weight = _batch([examples[i] for i in next(batches)], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        w = weight[:, 1:].reshape(-1)
        loss = (nll * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.detach().item())
    model.eval()
    return losses


def build_tiny_llm(out_dir: str | Path, seed: int = 0, corpus: list[str] | None = None,
                   steps: int = TRAIN_STEPS) -> Path:
    """Build the tiny caption LM into out_dir (safetensors, tokenizer, generation config); returns out_dir."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = default_corpus(seed) if corpus is None else list(corpus)
    if not docs:
        raise ValueError("the training corpus is empty")
    tok = train_bpe(tokenizer_texts(docs, builtin=corpus is None), LLM_VOCAB_SIZE)
    hf_tok = wrap_tokenizer(tok, model_max_length=LLM_ARCH["max_position_embeddings"])
    ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                      pad_token_id=ids[PAD], **LLM_ARCH)
    with deterministic_torch(seed):
        model = LlamaForCausalLM(cfg)
        if steps > 0:
            pretrain(model, _encode_documents(tok, docs), ids[PAD], steps=steps, seed=seed)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], **GENERATION_DEFAULTS)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out
