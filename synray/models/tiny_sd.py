"""Tiny random-weight Stable Diffusion pipeline and CLIP-style text tower, saved in the libraries' formats."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from synray.models.tiny_llm import deterministic_torch, document_captions, tokenizer_texts, train_bpe, wrap_tokenizer
from synray.models.tiny_specs import (BOS, CLIP_MAX_LENGTH, DECODER_OUT_GAIN, EOS, PAD, SCHEDULER_CONFIG, SD_TEXT_ARCH,
                                      TEXT_TOWER_ARCH, TEXT_VOCAB_SIZE, UNET_CONFIG, VAE_CONFIG, default_corpus)

def caption_tokenizer(seed: int = 0, corpus: Sequence[str] | None = None) -> Any:
    """A CLIP-style fast tokenizer (BOS ... EOS, padded to 77) trained on the corpus captions."""
    docs = default_corpus(seed) if corpus is None else list(corpus)
    texts = tokenizer_texts(document_captions(docs), builtin=corpus is None)
    tok = train_bpe(texts, TEXT_VOCAB_SIZE, add_eos=True)
    return wrap_tokenizer(tok, model_max_length=CLIP_MAX_LENGTH)


def _clip_text_config(tokenizer: Any, arch: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig   # here: importing transformers costs seconds

    return CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS), eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD), **arch)


def build_sd_pipeline(seed: int = 0, corpus: Sequence[str] | None = None) -> Any:
    """The tiny StableDiffusionPipeline in memory (random weights drawn from seed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = caption_tokenizer(seed, corpus)
    with deterministic_torch(seed):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(DECODER_OUT_GAIN)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, SD_TEXT_ARCH))
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def build_tiny_sd(out_dir: str | Path, seed: int = 0, corpus: Sequence[str] | None = None) -> Path:
    """Build and save the tiny SD pipeline (safetensors) into out_dir; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_sd_pipeline(seed, corpus).save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_text(out_dir: str | Path, seed: int = 0, corpus: Sequence[str] | None = None) -> Path:
    """Build and save a tiny CLIPTextModelWithProjection and its tokenizer into out_dir; returns out_dir."""
    out = Path(out_dir)
    from transformers import CLIPTextModelWithProjection

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = caption_tokenizer(seed, corpus)
    with deterministic_torch(seed):
        model = CLIPTextModelWithProjection(_clip_text_config(tokenizer, TEXT_TOWER_ARCH)).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
