"""Text banks (stores of kind ``text-bank``): word-list text embeddings computed once per
encoder, read by the negative-label detectors ``neglabel`` and ``csp``.

* :func:`build_text_bank` — ``npos text-bank --model ... --corpus wordnet --out TEXT.zarr``
* :func:`import_text_bank` — ``npos text-bank import --embeddings X.npy --words words.txt``
* :class:`TextBank`, :func:`check_bank_matches` — reading, and the encoder check
* :func:`load_corpus` — the shipped WordNet 3.0 noun/adjective list or a word file
"""

from npos.textbank.bank import KIND, TEXT_IDENTITY_KEYS, TextBank, build_text_bank, \
    check_bank_matches, import_text_bank
from npos.textbank.corpus import POS_NAMES, WORDNET, Corpus, load_corpus

__all__ = ["KIND", "POS_NAMES", "TEXT_IDENTITY_KEYS", "WORDNET", "Corpus", "TextBank",
           "build_text_bank", "check_bank_matches", "import_text_bank", "load_corpus"]
