"""The tutorial's expected values: what each chapter prints and checks, and what its test asserts.

``lmcheck tutorial`` and ``tests/test_0N_*.py`` import these, so the printed tutorial and the
asserting one cannot drift apart. Each value was read from the tutorial's own run, or from the
offline tokenizers and models it uses.
"""

from __future__ import annotations

from lmcheck.recipes import DEFAULTS

__all__ = [
    "BERT_BASE_STRUCTURE",
    "BERT_MASK_INDEX",
    "BERT_SENTENCE_IDS",
    "BERT_VOCAB",
    "GPT2_PROMPT_IDS",
    "GPT2_STRUCTURE",
    "GPT2_VOCAB",
    "PRETRAINED_BERT_TOP5",
    "PRETRAINED_BERT_TOP5_PROBABILITIES",
    "PRETRAINED_GPT2_CONTINUATION",
    "SMOLLM2_CONTINUATION",
]

GPT2_VOCAB = 50_257
BERT_VOCAB = 30_522
# "Life is like a [MASK] of chocolates." through bert-base-uncased: [CLS] ... [SEP], 11 ids
BERT_SENTENCE_IDS = (101, 2166, 2003, 2066, 1037, 103, 1997, 7967, 2015, 1012, 102)
BERT_MASK_INDEX = 5
# "Swimming at the beach is" through GPT-2's byte-level BPE: 6 ids, no special tokens
GPT2_PROMPT_IDS = (10462, 27428, 379, 262, 10481, 318)
# lines of print(model) for BERT-base (with its MLM head) and GPT-2 124M
BERT_BASE_STRUCTURE = ("(word_embeddings): Embedding(30522, 768", "(0-11): 12 x BertLayer",
                       "(cls): BertOnlyMLMHead", "(decoder): Linear(in_features=768, out_features=30522")
GPT2_STRUCTURE = ("(wte): Embedding(50257, 768)", "(wpe): Embedding(1024, 768)",
                  "(lm_head): Linear(in_features=768, out_features=50257, bias=False)")
# pretrained bert-base-uncased at the mask, as the tutorial prints them (4 decimals)
PRETRAINED_BERT_TOP5 = ("box", "bag", "bowl", "jar", "cup")
PRETRAINED_BERT_TOP5_PROBABILITIES = (0.1764, 0.1688, 0.0419, 0.0336, 0.0262)
# pretrained gpt2, greedy, 10 new tokens after the prompt
PRETRAINED_GPT2_CONTINUATION = " a great way to get a little extra energy."
# SmolLM2-135M-Instruct's greedy 20-token continuation of the prompt (checked with generate)
SMOLLM2_CONTINUATION: str = DEFAULTS["smollm2_continuation"]
