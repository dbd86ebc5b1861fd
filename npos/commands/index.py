"""`npos index`: build and inspect a store's persisted faiss IVF index.

``build`` writes the index folder (default ``STORE.index`` beside a local store);
``evaluate``/``score`` (``knn``) use it when present and refuse one that does not match the
store. See :mod:`npos.knn.store_index`.
"""

from __future__ import annotations

import json
import sys

import click

from npos.commands._common import device_option


def _ks(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in value.split(",") if k.strip())
    except ValueError:
        raise click.BadParameter(f"a comma-separated list of ints such as 50,400; got "
                                 f"{value!r}") from None
    if not ks:
        raise click.BadParameter("name at least one k, e.g. --k 50")
    return ks


@click.group("index")
def command() -> None:
    """Build and inspect one faiss IVF index per feature store (kNN at scale)."""


@command.command("build")
@click.argument("store")
@click.option("--out", metavar="PATH", help="Index folder. Default: STORE.index beside the "
                                            "store.")
@click.option("--codec", default="flat", show_default=True, metavar="flat|fp16|sq8",
              help="flat: float32 lists (4 bytes/dim); fp16: float16 lists (2 bytes/dim); "
                   "sq8: 8-bit scalar quantizer (1 byte/dim).")
@click.option("--nlist", default="auto", show_default=True, metavar="auto|N",
              help="IVF lists (auto: 4 sqrt(rows) as a power of two, ~100 rows per list).")
@click.option("--target-recall", type=float, default=0.95, show_default=True,
              help="Recall@k on held-out rows the tuned nprobe reaches.")
@click.option("--k", "ks", default="50", show_default=True, callback=_ks, metavar="LIST",
              help="Depths to tune nprobe for now (others up to max(LIST) on first use).")
@device_option("GPU: k-means and list assignment on all GPUs faiss sees.")
@click.option("--memory-budget", default="1G", show_default=True, metavar="SIZE",
              help="Working memory (e.g. 512M, 4G); the index itself comes on top.")
@click.option("--heldout", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Held-out query rows for tuning nprobe (at most a tenth of the rows).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the training sample and the held-out rows.")
@click.option("--overwrite", is_flag=True, help="Replace an existing index.")
def build(store, out, codec, nlist, target_recall, ks, device, memory_budget, heldout, seed,
          overwrite) -> None:
    """Build the IVF index of every valid row of STORE (cosine via L2 on unit vectors)."""
    from npos.knn.store_index_build import build_store_index
    from npos.store import FeatureStore
    from npos.validation import parse_size

    budget = parse_size("--memory-budget", memory_budget)
    fs = FeatureStore.open(store)
    index = build_store_index(fs, out, codec=codec, nlist=nlist, target_recall=target_recall,
                              ks=ks, device=device, memory_budget=budget, seed=seed,
                              heldout=heldout, overwrite=overwrite,
                              progress=sys.stderr.isatty())
    info = index.info()
    click.echo(f"wrote {info['path']}: {info['rows']} rows, nlist {info['nlist']}, "
               f"nprobe {info['nprobe']}, recall {info['recall']} "
               f"({info['build_seconds']:.1f} s)")


@command.command("info")
@click.argument("index")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(index: str, as_json: bool) -> None:
    """Summarize the store index INDEX: rows, codec, nlist, nprobe and recall per k, size."""
    from npos.knn.store_index import StoreIndex

    summary = StoreIndex.open(index).info()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        click.echo(f"{key:>13}: {value}")
