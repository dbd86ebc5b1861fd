"""Generate ``npos/data/wordnet_nouns_adjectives.tsv.gz`` from WordNet 3.0's own data files.

Run once (the output is shipped as package data; npos never needs WordNet installed)::

    apt-get install -y wordnet-base          # Debian/Ubuntu: /usr/share/wordnet/{index,data}.*
    python scripts/make_wordnet_corpus.py [--wordnet /usr/share/wordnet] [--out PATH]

What it keeps: every noun and adjective lemma of ``index.noun`` / ``index.adj`` that is a
single word (no ``_``: multi-word collocations such as ``hot_dog`` are left out), one row per
(lemma, part of speech). Its lexicographer category (``noun.animal``, ``adj.all``, ...) is the
one of the lemma's first synset in the index, i.e. its most frequent sense. Output: gzip TSV
with the header ``word, pos, lexname`` (``pos`` is ``n`` or ``a``), sorted by pos then word,
written reproducibly (gzip mtime 0). WordNet 3.0 gives 57,506 nouns and 20,983 adjectives
(78,489 rows; NegLabel's corpus has ~70k nouns and adjectives). The WordNet 3.0 license is
copied next to it as ``npos/data/WORDNET_LICENSE``.
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

#: The lexicographer files of WordNet 3.0, by number (WordNet's lexnames(5WN) page; the
#: Debian package does not ship the ``lexnames`` file itself).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
    "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
POS_FILES = {"n": "noun", "a": "adj"}
ROOT = Path(__file__).resolve().parents[1]


def lemmas(wordnet: Path, pos: str) -> list[tuple[str, str, str]]:
    """``(word, pos, lexname)`` of the single-word lemmas of one part of speech."""
    name = POS_FILES[pos]
    rows = []
    with open(wordnet / f"data.{name}", "rb") as data:
        for line in (wordnet / f"index.{name}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):  # the license header
                continue
            fields = line.split()
            word, synset_cnt, p_cnt = fields[0], int(fields[2]), int(fields[3])
            if "_" in word:
                continue
            # lemma pos synset_cnt p_cnt [ptr_symbol]*p_cnt sense_cnt tagsense_cnt offsets...
            offsets = fields[6 + p_cnt:6 + p_cnt + synset_cnt]
            data.seek(int(offsets[0]))  # synset offsets are byte offsets into data.*
            lex_filenum = int(data.readline().split()[1])
            rows.append((word, pos, LEXNAMES[lex_filenum]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--license", type=Path,
                        default=Path("/usr/share/doc/wordnet-base/copyright"))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "npos" / "data" / "wordnet_nouns_adjectives.tsv.gz")
    args = parser.parse_args()
    rows = sorted(lemmas(args.wordnet, "n") + lemmas(args.wordnet, "a"),
                  key=lambda r: (r[1] != "n", r[0]))
    text = "word\tpos\tlexname\n" + "".join(f"{w}\t{p}\t{x}\n" for w, p, x in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.encode("utf-8"))
    args.out.write_bytes(buffer.getvalue())
    # The WordNet 3.0 license paragraph of the Debian copyright file (Files: *, first block).
    block = args.license.read_text(encoding="utf-8").split("\n\n")[1]
    license_text = "\n".join(line[1:] if line.startswith(" ") else line
                             for line in block.splitlines()[3:])
    (args.out.parent / "WORDNET_LICENSE").write_text(
        "The word list npos/data/wordnet_nouns_adjectives.tsv.gz is derived from WordNet 3.0\n"
        "(Princeton University, https://wordnet.princeton.edu), under its license:\n\n"
        + license_text.replace("\n.\n", "\n\n") + "\n", encoding="utf-8")
    n = sum(r[1] == "n" for r in rows)
    print(f"wrote {args.out}: {n} nouns, {len(rows) - n} adjectives")


if __name__ == "__main__":
    main()
