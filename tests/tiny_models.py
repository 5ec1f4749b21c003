"""Tiny random-weight models of every supported architecture, saved with `save_pretrained` to a local folder so
they load through the same `from_pretrained` path as hub ids (no network). The tokenizer is a byte-level BPE
trained here on a few KB of WikiText; the Llama/Gemma variants prepend BOS like the real ones do."""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
FALLBACK = ("The capital of France is Paris . Danielle Darrieux is a native speaker of French . "
            "Sonny Simmons performs jazz poetry . How can I keep beads organized ? Cut an egg carton in half . ") * 50
ARCHS = ("gptj", "gpt_neox", "llama", "gemma3")


def train_tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = CORPUS_FILE.read_text(encoding="utf-8")[:200_000] if CORPUS_FILE.is_file() else FALLBACK
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    if bos:
        bos_id = tk.token_to_id("<|bos|>")
        tk.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                          special_tokens=[("<|bos|>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def tiny_config(arch: str, vocab: int, tok):
    from transformers import Gemma3TextConfig, GPTJConfig, GPTNeoXConfig, LlamaConfig

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gptj":
        return GPTJConfig(vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=4, n_head=4, rotary_dim=8,
                          n_inner=128, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=1024, **ids)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, **ids)
    if arch == "gemma3":
        return Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=1024, sliding_window=64, **ids)
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Build a random tiny model of ``arch`` with its tokenizer and `save_pretrained` both into ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = train_tokenizer(bos=arch in ("llama", "gemma3"))
    cfg = tiny_config(arch, len(tok), tok)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default init so probabilities are not all ~uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
