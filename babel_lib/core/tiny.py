"""Tiny randomly initialised models of every supported family, built from a config with no download.

Names look like `tiny:llama` or `tiny:llama:1` (the seed). Tests and the smoke profile use them; the
tokenizer is byte-level with <pad>, <bos> and <eos>, and adds <bos> like LLaMA's does.
`python -m babel_lib.core.tiny llama2-7b FOLDER` saves a random model of a real shape as a Hugging Face folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from babel_lib.errors import BabelError

VOCAB = 3 + 256  # <pad> <bos> <eos> and one token per byte
HIDDEN, WIDTH, LAYERS, HEADS = 32, 48, 3, 4


def _configs() -> dict[str, object]:
    import transformers as tf

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": VOCAB}
    common = {**ids, "hidden_size": HIDDEN, "intermediate_size": WIDTH, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "max_position_embeddings": 256}
    gqa = {**common, "num_key_value_heads": 2, "head_dim": HIDDEN // HEADS}
    return {
        "llama": tf.LlamaConfig(**gqa),
        "mistral": tf.MistralConfig(**gqa),
        "qwen2": tf.Qwen2Config(**gqa),
        "qwen3": tf.Qwen3Config(**gqa),
        "gemma": tf.GemmaConfig(**gqa),
        "gemma2": tf.Gemma2Config(**gqa),
        "gemma3_text": tf.Gemma3TextConfig(**gqa),
        "phi3": tf.Phi3Config(**gqa),
        "gpt2": tf.GPT2Config(**ids, n_embd=HIDDEN, n_inner=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=256),
        "gpt_neox": tf.GPTNeoXConfig(**common),
        "opt": tf.OPTConfig(**ids, hidden_size=HIDDEN, ffn_dim=WIDTH, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, max_position_embeddings=256, word_embed_proj_dim=HIDDEN),
    }


TINY_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2",
              "gpt_neox", "opt")


def byte_tokenizer():
    """A byte-level tokenizer (no merges) that adds <bos>: enough to run any text through a tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2} | {ch: i + 3 for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def tiny_model(name: str, attn_implementation: str | None = None):
    """(model, tokenizer) for `tiny:<model_type>[:seed]`, weights drawn from the seed."""
    from transformers import AutoModelForCausalLM

    parts = name.split(":")
    model_type = parts[1] if len(parts) > 1 else ""
    if model_type not in TINY_TYPES or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
        raise BabelError(f"unknown tiny model {name!r}; use tiny:<type>[:seed] with type in {', '.join(TINY_TYPES)}")
    seed = int(parts[2]) if len(parts) == 3 else 0
    config = _configs()[model_type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    return model, byte_tokenizer()


SHAPES = {  # LlamaConfig keywords of real model shapes, for random-weight runs at scale (timing, memory, paths)
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama-small": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512},
}


def subword_tokenizer(path: str | Path):
    """A trained `tokenizers` BPE file (e.g. the zoo's, `.tokens/pretrain/tokenizer.json`) made a full HF tokenizer:
    <pad> and <bos> appended after its vocabulary, <bos> added to every text, its own <eos> kept."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not path.is_file():
        raise BabelError(f"no tokenizer file at {path}; pass a tokenizers JSON (make pretrain writes "
                         ".tokens/pretrain/tokenizer.json) or leave --tokenizer out for the byte tokenizer")
    core = Tokenizer.from_file(str(path))
    if core.token_to_id("<eos>") is None:
        raise BabelError(f"{path} has no <eos> token; train it with one (the zoo's tokenizer has it)")
    core.add_special_tokens([AddedToken("<pad>", special=True), AddedToken("<bos>", special=True)])
    core.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                        special_tokens=[("<bos>", core.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def save_random(shape: str, folder: str | Path, dtype: str = "bfloat16", seed: int = 0,
                device: str = "cpu", tokenizer: str | Path | None = None) -> Path:
    """Save a LLaMA model of a real `shape` with random weights as a plain Hugging Face folder (`from_pretrained`
    loads it; so does `MODEL=<folder>`): its findings are noise, its time and memory not. The tokenizer is the
    byte tokenizer, or the BPE file `tokenizer` (subword_tokenizer): a subword vocabulary gives token counts near
    a real model's (the byte tokenizer makes the LibreOffice corpus 3.3x longer than an 8k BPE does)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in SHAPES:
        raise BabelError(f"unknown shape {shape!r}; pick one of {', '.join(SHAPES)}")
    tok = byte_tokenizer() if tokenizer is None else subword_tokenizer(tokenizer)
    if len(tok) > SHAPES[shape]["vocab_size"]:
        raise BabelError(f"the tokenizer has {len(tok):,} tokens, more than shape {shape!r}'s vocabulary "
                         f"({SHAPES[shape]['vocab_size']:,}); pick a smaller tokenizer")
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = LlamaConfig(**SHAPES[shape], **ids, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m babel_lib.core.tiny",
                                     description="save a random-weight model of a real shape as a Hugging Face folder")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", help="where the weights are drawn (cuda is much faster at 7B)")
    parser.add_argument("--tokenizer", help="a tokenizers BPE file with <eos> (default: the byte tokenizer)")
    args = parser.parse_args()
    try:
        print(save_random(args.shape, args.folder, args.dtype, device=args.device, tokenizer=args.tokenizer))
    except BabelError as err:
        raise SystemExit(f"error: {err}") from None
