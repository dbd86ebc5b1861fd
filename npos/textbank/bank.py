"""Text banks: a store of kind ``text-bank`` holding the text embeddings of a word list.

Layout (an npos feature store, readable with plain zarr): ``embeddings`` (N, D) float32, one
unit row per word — the prompt-ensemble text embedding (:func:`npos.extract.text
.text_embeddings`: each template embedded, normalized, averaged, normalized again);
``ids`` ``word.n`` / ``word.a`` (or the word); ``labels`` the part of speech (0 noun,
1 adjective, -1 not given; ``class_names`` names them); ``word`` and ``lexname`` (row
arrays of strings). Group attributes: ``kind="text-bank"``, ``model``, ``pretrained``,
``seed``, ``dim`` (the identity an image store must share: :func:`check_bank_matches`;
``preprocess`` is an image setting and is ``None`` here), ``templates``, ``corpus``
(name, rows, sha256).

Building is chunked and resumable like ``extract``: chunk rows are written, then the chunk's
``done`` flag; a re-run with the same model, templates and corpus fills only missing chunks.
It runs in one process (the text encoder embeds ~78k words x 18 templates in minutes on
one GPU, so there is no torchrun split).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from npos.errors import IncompatibleStoreError, ParameterError
from npos.store import IDENTITY_KEYS, FeatureStore, store_exists
from npos.textbank.corpus import POS_NAMES, SUPERCLASSES, Corpus, load_corpus, parse_lines, \
    with_conjugates

KIND = "text-bank"
#: What must agree between a text bank and the image stores it scores (the image
#: preprocessing has no meaning for text).
TEXT_IDENTITY_KEYS = tuple(k for k in IDENTITY_KEYS if k != "preprocess")


class TextBank:
    """A text bank read into memory: ``embeddings`` (N, D) float32 unit rows, ``words``,
    ``pos`` (N,) int (0 noun, 1 adjective, -1 unknown), ``lexnames``, ``ids``, ``url``,
    ``attrs``."""

    def __init__(self, url: str):
        fs = FeatureStore.open(str(url), kinds=(KIND,), what="the text-bank detectors")
        self.url = fs.url
        self.attrs = fs.attrs
        emb = fs.read("embeddings", dtype="float32")
        self.embeddings = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
        self.pos = fs.read("labels").astype(np.int64)
        self.ids = [str(i) for i in fs.read("ids")]
        self.words = [str(w) for w in fs.read("word")]
        self.lexnames = [str(x) for x in fs.read("lexname")]
        fs.close()

    def fingerprint(self) -> dict[str, Any]:
        return {key: self.attrs.get(key) for key in TEXT_IDENTITY_KEYS}


def check_bank_matches(bank: TextBank, store: FeatureStore, *, what: str) -> None:
    """Refuse a text bank whose encoder (model, weights, seed, dim) differs from ``store``'s."""
    mine = store.fingerprint()
    for key in TEXT_IDENTITY_KEYS:
        if mine.get(key) != bank.attrs.get(key):
            raise IncompatibleStoreError(
                f"text bank {bank.url!r} does not match {what} {store.url!r}: {key} is "
                f"{bank.attrs.get(key)!r} there but {mine.get(key)!r} in the store")


def _create(out: str, corpus: Corpus, dim: int, attrs: dict[str, Any], *, chunk_rows: int,
            overwrite: bool) -> FeatureStore:
    """Create the bank, or reopen one made from the same inputs to fill its missing chunks."""
    attrs = {**attrs, "dim": dim, "corpus": {"name": corpus.name, "rows": len(corpus),
                                             "sha256": corpus.digest()}}
    if store_exists(out) and not overwrite:
        fs = FeatureStore.open(out, "r+", kinds=(KIND,), what="text-bank")
        for key in (*TEXT_IDENTITY_KEYS, "templates", "superclasses", "corpus"):
            if fs.attrs.get(key) != attrs.get(key):
                fs.close()
                raise IncompatibleStoreError(
                    f"cannot resume text bank {out!r}: {key} is {fs.attrs.get(key)!r} there but "
                    f"{attrs.get(key)!r} now; pass --overwrite to start over")
        return fs
    fs = FeatureStore.create(out, n_rows=len(corpus), dim=dim, dtype="float32",
                             chunk_rows=chunk_rows, kind=KIND,
                             class_names=list(POS_NAMES), attrs=attrs, overwrite=overwrite)
    fs.add_array("word", (), "str", fill_value="")
    fs.add_array("lexname", (), "str", fill_value="")
    return fs


def _write(fs: FeatureStore, corpus: Corpus, index: int, embeddings: np.ndarray) -> None:
    rows = fs.chunk_slice(index)
    fs.write_chunk(index, embeddings=embeddings.astype(np.float32),
                   labels=np.asarray(corpus.pos[rows], np.int32),
                   ids=np.asarray(corpus.ids()[rows], dtype=object),
                   word=np.asarray(corpus.words[rows], dtype=object),
                   lexname=np.asarray(corpus.lexnames[rows], dtype=object))


def build_text_bank(out: str, *, model: str, pretrained: str | None, corpus: str = "wordnet",
                    templates: Sequence[str] | None = None, seed: int = 0,
                    superclasses: Sequence[str] = SUPERCLASSES,
                    device: str = "auto", chunk_rows: int = 4096, batch_size: int = 1024,
                    overwrite: bool = False, progress: bool = False) -> FeatureStore:
    """Embed a word list with prompt templates into a text bank at ``out`` (resumable).

    Parameters
    ----------
    model, pretrained, seed
        The encoder, as in ``npos extract`` (the bank's identity must match the image
        stores it is used with).
    corpus : str
        ``"wordnet"`` or a word file (:func:`npos.textbank.corpus.load_corpus`).
    templates : sequence of str, optional
        Prompt templates (default: extract's 18, so words and classes are embedded alike).
    superclasses : sequence of str
        CSP's superclass words: every adjective also gets a ``conjugated`` row, the mean of
        the embeddings of ``"<adjective> <superclass>"`` over them (normalized). Empty: none.
    """
    from tqdm.auto import tqdm

    from npos.device import resolve_device
    from npos.encoder import create_encoder, resolve_weights
    from npos.extract.text import DEFAULT_TEMPLATES, text_embeddings, validate_templates

    superclasses = tuple(str(s).strip() for s in superclasses if str(s).strip())
    words = with_conjugates(load_corpus(corpus), superclasses)
    templates = validate_templates(templates or DEFAULT_TEMPLATES)
    weights = resolve_weights(model, pretrained)
    dev = resolve_device(device)
    clip = create_encoder(weights, seed=seed).to(dev)
    tokenizer = _tokenizer(model)
    dim = int(text_embeddings(clip, tokenizer, ["probe"], templates[:1]).shape[1])
    attrs = {"model": model, "pretrained": weights.identity, "preprocess": None,
             "seed": seed if weights.random_init else None, "templates": templates,
             "superclasses": list(superclasses)}
    fs = _create(str(out), words, dim, attrs, chunk_rows=chunk_rows, overwrite=overwrite)
    for index in tqdm(fs.missing_chunks(), desc="text bank", unit="chunk",
                      disable=not progress):
        rows = np.arange(len(words))[fs.chunk_slice(index)]
        _write(fs, words, index, _embed_rows(clip, tokenizer, words, rows, templates,
                                             superclasses, batch_size, dim))
    return fs


def _embed_rows(clip, tokenizer, words: Corpus, rows: np.ndarray, templates, superclasses,
                batch_size: int, dim: int) -> np.ndarray:
    """Embeddings of ``rows``: a word's prompt ensemble; a conjugated row's normalized mean
    of the prompt ensembles of ``"<adjective> <superclass>"`` over the superclasses."""
    from npos.extract.text import text_embeddings

    conj = np.asarray([words.pos[i] == 2 for i in rows], dtype=bool)
    out = np.empty((len(rows), dim), np.float32)
    if (~conj).any():
        out[~conj] = text_embeddings(clip, tokenizer, [words.words[i] for i in rows[~conj]],
                                     templates, batch_size=batch_size)
    if conj.any():
        names = [f"{words.words[i]} {s}" for i in rows[conj] for s in superclasses]
        per = text_embeddings(clip, tokenizer, names, templates, batch_size=batch_size)
        mean = per.reshape(int(conj.sum()), len(superclasses), dim).mean(axis=1)
        out[conj] = mean / np.linalg.norm(mean, axis=1, keepdims=True).clip(1e-12)
    return out


def _tokenizer(model: str):
    import open_clip

    return open_clip.get_tokenizer(model)


def import_text_bank(embeddings: str | os.PathLike | np.ndarray, words: str | os.PathLike,
                     out: str, *, pos: str | None = None, model: str = "imported",
                     pretrained: str | None = None, chunk_rows: int = 4096,
                     overwrite: bool = False) -> FeatureStore:
    """A text bank from one's own embeddings (.npy, (N, D)) and word file (N lines,
    ``word[\\tpos[\\tlexname]]``; see :mod:`npos.textbank.corpus`). ``pos`` (``n``, ``a``
    or ``c``) is the part of speech of the lines that give none."""
    emb = np.load(embeddings) if not isinstance(embeddings, np.ndarray) else embeddings
    if emb.ndim != 2 or not np.isfinite(emb).all():
        raise ParameterError(f"--embeddings {str(embeddings)!r} must be a finite (N, D) array")
    lines = open(words, encoding="utf-8").read().splitlines()
    if pos is not None:
        lines = [line if "\t" in line or not line.strip() else f"{line}\t{pos}"
                 for line in lines]
    corpus = parse_lines(lines, str(words))
    if len(corpus) != len(emb):
        raise ParameterError(f"--words {str(words)!r} has {len(corpus)} words but "
                             f"--embeddings has {len(emb)} rows")
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    attrs = {"model": model, "pretrained": pretrained, "preprocess": None, "seed": None,
             "templates": None, "superclasses": None}
    fs = _create(out, corpus, emb.shape[1], attrs, chunk_rows=chunk_rows, overwrite=overwrite)
    for index in fs.missing_chunks():
        _write(fs, corpus, index, emb[fs.chunk_slice(index)])
    return fs
