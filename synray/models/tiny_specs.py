"""What the tiny offline models are (architectures, vocabularies, training budget, corpus): their builds'
fingerprint reads this, without torch; `tiny_llm` and `tiny_sd` build them."""

from __future__ import annotations

from typing import Any

from synray.language.corpus import training_corpus

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
LLM_VOCAB_SIZE = 1000
CORPUS_DOCS = 3000
# Loss weight of prompt tokens; the completion (" caption\n" and EOS) has weight 1. The prompt's
# in-context `input => caption` lines are useful targets too, so they count fully.
PROMPT_LOSS_WEIGHT = 1.0
# Pre-training budget: 200 AdamW steps of 16 documents (~115 tokens each) fit in ~30 s on one core.
TRAIN_STEPS = 200
TRAIN_BATCH_SIZE = 16
TRAIN_LR = 6e-3
MAX_TRAIN_TOKENS = 512
# One thread: the float reductions (so the saved bytes) match on any machine, and a busy machine
# does not slow the build down the way oversubscribed OpenMP threads do.
BUILD_THREADS = 1
LLM_ARCH: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5,
    tie_word_embeddings=False, initializer_range=0.02,
)
GENERATION_DEFAULTS: dict[str, Any] = dict(do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=100)


def default_corpus(seed: int = 0, num_docs: int = CORPUS_DOCS) -> list[str]:
    """The built-in training corpus (SynCLR and LaCLIP prompt documents with their completions)."""
    return list(training_corpus(seed, num_docs))


CLIP_MAX_LENGTH = 77
TEXT_VOCAB_SIZE = 1000
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
)
# Four blocks: diffusers' vae_scale_factor = 2 ** (len(block_out_channels) - 1) = 8, as in SD.
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
)
# Stable Diffusion 1.5's training noise schedule, sampled with DDIM.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
SD_TEXT_ARCH: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2)
TEXT_TOWER_ARCH: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, projection_dim=64)
# Gain on the random VAE decoder's output conv so decoded images span the pixel range.
DECODER_OUT_GAIN = 1.5
