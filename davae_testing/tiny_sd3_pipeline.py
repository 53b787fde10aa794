"""A complete tiny diffusers SD3 folder (model_index.json and every component), for tests and smoke runs.

Around a tiny transformer and VAE (``davae_core.fixtures``: ``sd3_transformer``, ``sd3_vae``) it
puts random-weight CLIP-L, CLIP-G and T5 whose tokenizers are built offline (byte-level CLIP
BPE, character T5), so ``davae_training.stage2.text_conditioning.SD3TextConditioner``, the
synthetic-data command and the trainer's real text path run without any download.  The
encoders encode nothing meaningful.  Needs training's environment (diffusers, transformers).
Run from the repository root:

    python -m davae_testing.tiny_sd3_pipeline --write-tiny FOLDER --transformer runs/fixtures/sd3_transformer \\
        --vae runs/fixtures/sd3_vae
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

import torch


def byte_level_clip_tokenizer(folder: Path):
    """CLIP's byte-level BPE with no merges: every character is a token (vocab of 514)."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):  # GPT-2/CLIP's byte -> unicode table
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(str(folder))
    return tok


def character_t5_tokenizer(folder: Path):
    """A unigram tokenizer over single characters, in T5's layout (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                          model_max_length=512)
    tok.save_pretrained(str(folder))
    return tok


def tiny_text_encoders(joint_attention_dim: int = 64, pooled_dim: int = 32, seed: int = 0, with_t5: bool = True) -> dict:
    """Random-weight CLIP-L, CLIP-G (and T5) with offline tokenizers, as StableDiffusion3Pipeline
    components, sized for a transformer with these ``joint_attention_dim`` / ``pooled_projection_dim``.
    They encode nothing meaningful."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if joint_attention_dim % 2 or pooled_dim % 2:
        raise ValueError("joint_attention_dim and pooled_dim must be even (split between CLIP-L and CLIP-G)")
    torch.manual_seed(seed)
    parts: dict = {"text_encoder_3": None, "tokenizer_3": None}
    with tempfile.TemporaryDirectory() as tmp:
        for sub in ("", "_2"):
            tok = byte_level_clip_tokenizer(Path(tmp) / f"tokenizer{sub}")
            cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=joint_attention_dim // 2,
                                 intermediate_size=2 * joint_attention_dim, num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=77, projection_dim=pooled_dim // 2, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            parts[f"tokenizer{sub}"] = tok
            parts[f"text_encoder{sub}"] = CLIPTextModelWithProjection(cfg).eval()
        if with_t5:
            tok = character_t5_tokenizer(Path(tmp) / "tokenizer_3")
            cfg = T5Config(vocab_size=len(tok), d_model=joint_attention_dim, d_ff=2 * joint_attention_dim,
                           d_kv=joint_attention_dim // 2, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                           decoder_start_token_id=0)
            parts["tokenizer_3"], parts["text_encoder_3"] = tok, T5EncoderModel(cfg).eval()
    return parts


def write_tiny_sd3_pipeline(folder: str | Path, transformer_dir: str | Path, vae_dir: str | Path, seed: int = 0,
                            with_t5: bool = True) -> Path:
    """A complete diffusers SD3 folder (model_index.json, all components) around a tiny transformer
    and VAE, with :func:`tiny_text_encoders`: for tests and smoke runs of the real code paths."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel.from_pretrained(str(transformer_dir))
    encoders = tiny_text_encoders(transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim, seed, with_t5)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=AutoencoderKL.from_pretrained(str(vae_dir)),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **encoders)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m davae_testing.tiny_sd3_pipeline",
                                 description="Write a tiny random diffusers SD3 folder (for tests and smoke runs).")
    ap.add_argument("--write-tiny", required=True, metavar="FOLDER")
    ap.add_argument("--transformer", required=True, help="a tiny SD3Transformer2DModel folder (davae_core.fixtures: sd3_transformer)")
    ap.add_argument("--vae", required=True, help="a tiny SD3-layout AutoencoderKL folder (davae_core.fixtures: sd3_vae)")
    ap.add_argument("--no-t5", action="store_true")
    args = ap.parse_args(argv)
    print(write_tiny_sd3_pipeline(args.write_tiny, args.transformer, args.vae, with_t5=not args.no_t5))


if __name__ == "__main__":
    main()
