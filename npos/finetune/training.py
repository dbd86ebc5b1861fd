"""`finetune`: train the tail of the open_clip ViT together with a head, from cached tokens.

The objective is exactly ``train-head``'s (:class:`npos.train_head.HeadObjective`: ID loss on
the cosine logits + λ · balanced BCE of the OOD head against outliers synthesized online in the
projected space), and so is the loop (:func:`npos.train_head.run_epoch`: cosine learning-rate
schedule, bfloat16 autocast on CUDA, float32 master weights). Only the embeddings' producer
differs: instead of reading cached embeddings, every batch of cached tokens runs through the
trainable :class:`~npos.finetune.tail.VisionTail`, and the gradient of the loss flows into it.

Outputs in ``OUT/``::

    tail.safetensors   the tuned tail (open_clip key names), float32
    tail.json          model, weights identity, layer, training config, history, sha256
    head/              the head (``model.safetensors`` + ``config.json``, as train-head)
    NAME.zarr          every ``embed`` store, re-embedded with the tuned tail
    train.partial/     while training: the state of the last finished epoch (for resume)

The tuned encoder gets a new weights identity, ``<pretrained>+finetune:sha256:<tail file>``:
the head's ``fingerprint`` and every re-embedded store carry it, so ``evaluate`` accepts the
re-embedded stores with the head and refuses the original stores with it.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npos import __version__
from npos.errors import IncompatibleStoreError, ParameterError
from npos.device import resolve_device
from npos.encoder import DEFAULT_SEED, create_encoder, resolve_weights
from npos.finetune.embedding import embed_store, embedded_attrs
from npos.finetune.tail import (TAIL_CONFIG, TAIL_FILE, TailError, VisionTail, load_tail_weights,
                                read_tail_config, save_tail)
from npos.finetune.tokens import TokenSpec, TokenStream, check_same_tokens, token_spec
from npos.store import FeatureStore
from npos.train_head import HeadConfig, HeadObjective, run_epoch
from npos.train_head.checkpoint import (FORMAT as HEAD_FORMAT, CheckpointError,
                                        CheckpointExistsError, read_checkpoint_dir,
                                        write_checkpoint_dir)
from npos.train_head.training import (build_head, check_class_counts, cosine_lr, load_labeled,
                                      load_optimizer_state, make_optimizer, save_partial,
                                      split_prefixes)
from npos.validation import check_float, check_int

HEAD_DIR = "head"
PARTIAL_DIR = "train.partial"
STATE_FORMAT = "npos.finetune-state/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class FinetuneConfig:
    """What fine-tuning adds to the head's parameters (:class:`HeadConfig`).

    Parameters
    ----------
    tail_lr_scale : float
        The tail's learning rate is ``head.lr * tail_lr_scale`` (the paper: 1, i.e. the
        encoder at ``lr`` and the OOD head at ``lr * head_lr_scale``).
    window_rows : int or None
        Rows shuffled together when streaming tokens (see :class:`TokenStream`); default
        ``8 * batch_size``.
    embed_batch_size : int
        Rows per forward pass when re-embedding stores.
    """

    tail_lr_scale: float = 1.0
    window_rows: int | None = None
    embed_batch_size: int = 256

    def validate(self) -> None:
        """Raise :class:`ParameterError` for the first invalid parameter."""
        check_float("tail_lr_scale", self.tail_lr_scale, 0.0, low_open=True, owner="finetune")
        check_int("window_rows", self.window_rows, 1, allow_none=True, owner="finetune")
        check_int("embed_batch_size", self.embed_batch_size, 1, owner="finetune")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes
    ----------
    out_dir : str
    tail : dict
        The tail's description (``tail.json``).
    head_dir : str
    stores : dict
        ``--embed`` name -> URL of the re-embedded store.
    history : list of dict
        Per epoch: ``epoch``, ``id_loss``, ``outlier_loss``, ``accuracy``, ``synth_steps``,
        ``seconds``, ``samples_per_s``.
    resumed_from : int
        Epochs already done when the run started (0 unless resumed; ``epochs`` when only the
        re-embedding was left).
    """

    out_dir: str
    tail: dict[str, Any]
    head_dir: str
    stores: dict[str, str]
    history: list[dict[str, Any]]
    resumed_from: int


# ---------------------------------------------------------------------- inputs
def parse_embed_specs(specs) -> dict[str, str]:
    """``["NAME=STORE", ...]`` (or a mapping) -> ``{NAME: STORE}``, names checked."""
    pairs = list(specs.items()) if isinstance(specs, Mapping) else []
    if not isinstance(specs, Mapping):
        for spec in specs:
            name, sep, url = str(spec).partition("=")
            if not sep or not name or not url:
                raise ParameterError(f"--embed takes NAME=STORE; got {spec!r}")
            pairs.append((name, url))
    out: dict[str, str] = {}
    for name, url in pairs:
        if not _NAME.match(name) or name in (HEAD_DIR, PARTIAL_DIR):
            raise ParameterError(
                f"--embed name {name!r} must be letters, digits, '_', '-' or '.' (not "
                f"{HEAD_DIR!r}); it becomes OUT/{name}.zarr")
        if name in out:
            raise ParameterError(f"--embed name {name!r} is given twice")
        out[name] = str(url)
    return out


def _open_token_store(url: str, what: str) -> tuple[FeatureStore, TokenSpec]:
    store = FeatureStore.open(url)
    spec = token_spec(store, what=what)
    store.readable_rows(complete=True)
    return store, spec


def _check_encoder(store: FeatureStore, model: str, pretrained: str | None):
    """The resolved weights of ``model``/``pretrained``, which must be the store's encoder."""
    weights = resolve_weights(model, pretrained)
    have = (store.attrs.get("model"), store.attrs.get("pretrained"))
    if have != (weights.model, weights.identity):
        raise IncompatibleStoreError(
            f"training store {store.url!r} holds tokens of model {have[0]!r} with weights "
            f"{have[1]!r}, not of {weights.model!r} with weights {weights.identity!r}; pass "
            "the --model/--pretrained it was extracted with")
    return weights


def _outputs(out: Path, names) -> list[Path]:
    return [out / TAIL_FILE, out / TAIL_CONFIG, out / HEAD_DIR, out / PARTIAL_DIR,
            *(out / f"{name}.zarr" for name in names)]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ---------------------------------------------------------------------- the head
class _SampleProgress:
    """Lets :func:`run_epoch` (which counts steps) drive a bar that counts samples, so the
    bar's rate is samples/s."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.rows = 0  # rows of the batch being trained on

    def update(self, steps: int) -> None:
        self.bar.update(self.rows * steps)

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(**values)


def _tail_batches(stream: TokenStream, tail: VisionTail, generator: torch.Generator,
                  device: torch.device, amp: bool,
                  progress: _SampleProgress) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Embeddings of shuffled token batches through the trainable tail (graph attached)."""
    for tokens, labels in stream.epoch(generator):
        tokens = tokens.to(device, non_blocking=True).float()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            z = tail(tokens)
        progress.rows = labels.shape[0]
        yield z, labels.to(device, non_blocking=True)


# ---------------------------------------------------------------------- resumable state
def _check_same_run(saved: Mapping[str, Any], record: Mapping[str, Any], where: Path) -> None:
    record = json.loads(json.dumps(record))  # compare as stored (tuples become lists)
    diff = [k for k in sorted(record) if saved.get(k) != record[k]]
    if diff:
        raise CheckpointError(
            f"cannot resume from {str(where)!r}: it was made with other settings "
            f"({', '.join(diff[:5])} differ); pass --overwrite to start over")


# ---------------------------------------------------------------------- the stage
def finetune(train_store: str, out_dir: str, *, model: str, pretrained: str | None = None,
             head_config: HeadConfig | None = None, config: FinetuneConfig | None = None,
             embed: Mapping[str, str] | None = None, device: str | torch.device = "auto",
             overwrite: bool = False, resume: bool = False, progress: bool | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune the encoder's tail and a head from a token store; re-embed stores with it.

    Parameters
    ----------
    train_store : str
        Labeled store extracted with ``--tokens-layer L``.
    out_dir : str
        Output directory (see the module docstring).
    model, pretrained : str
        The encoder the tokens came from (checked against the store); ``pretrained`` as for
        ``npos extract`` (tag, checkpoint file, ``none``).
    head_config : HeadConfig, optional
        The objective, optimizer, schedule and seed, as for ``train-head``. ``lr`` applies
        to the projection and classifier, ``lr * config.tail_lr_scale`` to the tail.
    config : FinetuneConfig, optional
    embed : mapping of str to str, optional
        NAME -> token store to re-embed into ``OUT/NAME.zarr`` (same model, weights, seed,
        preprocessing and layer as the training store).
    device : {"auto", "cpu", "cuda"} or torch.device
    overwrite : bool
        Replace existing outputs of this run (``tail.*``, ``head/``, the NAME.zarr stores).
    resume : bool
        Continue an interrupted run: training from its last finished epoch (same settings
        required), then the chunks of the re-embedded stores not yet written.
    progress : bool or None
        Progress bars with samples/s (None: when stderr is a terminal).
    log : callable, optional
        Receives one line per epoch and per written output.

    Returns
    -------
    FinetuneResult
    """
    head_config = head_config or HeadConfig()
    config = config or FinetuneConfig()
    head_config.validate()
    config.validate()
    if head_config.id_loss == "none" and head_config.detach_head:
        raise ParameterError(
            "with id_loss='none' and a detached OOD head no loss reaches the tail, so "
            "fine-tuning would change nothing; choose an ID loss or --no-detach-head")
    if overwrite and resume:
        raise ParameterError("pass either --overwrite or --resume, not both")
    embed = parse_embed_specs(embed or {})
    device = resolve_device(device)
    say = log or (lambda line: None)

    # ---- validate every input before anything is read in bulk, removed or written
    store, spec = _open_token_store(train_store, "training store")
    weights = _check_encoder(store, model, pretrained)
    sources: dict[str, FeatureStore] = {}
    for name, url in embed.items():
        what = f"--embed store {name!r} ({url!r})"
        other, other_spec = _open_token_store(url, what)
        check_same_tokens(spec, other_spec, what=what,
                          reference=f"the training store {store.url!r}")
        sources[name] = other
    out = Path(out_dir)
    existing = [p for p in _outputs(out, embed) if p.exists()]
    if existing and not (overwrite or resume):
        shown = ", ".join(repr(str(p)) for p in existing[:4])
        raise CheckpointExistsError(f"{shown} already exist(s); pass --overwrite to replace, or "
                                    "--resume to continue an interrupted run")
    data = load_labeled(store)
    check_class_counts(data, head_config, store.url)
    seed_attr = store.attrs.get("seed")
    clip = create_encoder(weights, seed=DEFAULT_SEED if seed_attr is None else int(seed_attr))
    tail = VisionTail(clip.visual, spec.layer)
    del clip
    if (spec.shape[1], store.dim) != (tail.width, tail.output_dim):
        raise IncompatibleStoreError(
            f"training store {store.url!r} has tokens of width {spec.shape[1]} and "
            f"embeddings of dim {store.dim}, but {weights.model!r} has width {tail.width} and "
            f"dim {tail.output_dim}")
    if overwrite:
        for path in existing:
            _remove(path)
    out.mkdir(parents=True, exist_ok=True)

    record: dict[str, Any] = {
        "model": weights.model, "pretrained": weights.identity,
        "quick_gelu": weights.quick_gelu, "seed_init": seed_attr,
        "token_shape": list(spec.shape), "preprocess": store.attrs.get("preprocess"),
        "dim": store.dim, "train_store": store.url, "base_fingerprint": store.fingerprint(),
        # What decides the trained weights; embed_batch_size does not, so a resumed run may
        # change it.
        "head_config": head_config.to_dict(),
        "finetune": {"tail_lr_scale": config.tail_lr_scale, "window_rows": config.window_rows},
        "token_layer": spec.layer,
    }
    head_record = {
        "format": HEAD_FORMAT, **head_config.to_dict(), "dim": store.dim,
        "num_classes": len(data.class_names), "class_names": data.class_names,
        "classifier": "text" if data.text is not None else "prototypes",
        "classifier_trainable": data.text is None or head_config.train_text,
        "train_store": store.url, "train_rows": int(data.y.numel()), "val_store": None,
    }

    # ---- training (or its saved result, when resuming after it finished)
    head_dir = out / HEAD_DIR
    if resume and (out / TAIL_CONFIG).exists():
        # Read as is: a run killed between writing the weights and tail.json leaves a
        # description of older weights, which the partial state replaces.
        _check_same_run(json.loads((out / TAIL_CONFIG).read_text(encoding="utf-8")), record,
                        out / TAIL_CONFIG)
    done = resume and (out / TAIL_CONFIG).exists() and head_dir.exists()
    if done:
        tail_config = read_tail_config(out)
        _, head_saved = read_checkpoint_dir(head_dir)
        if head_saved.get("fingerprint") != tail_config["fingerprint"]:
            raise TailError(f"{str(head_dir)!r} was not trained with {str(out / TAIL_FILE)!r}; "
                            "pass --overwrite to start over")
        load_tail_weights(tail, out)
        history, first_epoch = list(tail_config["history"]), head_config.epochs
        say(f"training already finished in {str(out)!r}; re-embedding what is left")
    else:
        tail_config, history, first_epoch = _train(
            store, data, tail, record, head_record, head_config, config, out, device,
            resume=resume, progress=progress, say=say)

    # ---- re-embedding
    stores: dict[str, str] = {}
    for name, source in sources.items():
        url = str(out / f"{name}.zarr")
        attrs = embedded_attrs(source, tail_config["fingerprint"]["pretrained"],
                               {"tail": str((out / TAIL_FILE).resolve()),
                                "sha256": tail_config["sha256"], "token_layer": spec.layer})
        embed_store(tail.to(device), source, url, attrs=attrs,
                    batch_size=config.embed_batch_size, device=device, resume=resume,
                    progress=progress)
        stores[name] = url
        say(f"re-embedded {source.url!r} -> {url!r}")
    return FinetuneResult(str(out), tail_config, str(head_dir), stores, history, first_epoch)


def _train(store: FeatureStore, data, tail: VisionTail, record: dict[str, Any],
           head_record: dict[str, Any], head_config: HeadConfig, config: FinetuneConfig,
           out: Path, device: torch.device, *, resume: bool, progress: bool | None,
           say: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The training loop of :func:`finetune`; writes tail and head. Returns the tail's
    description, the history and the number of epochs done before this run."""
    from tqdm.auto import tqdm

    model, means = build_head(data, head_config)
    tail.to(device).train()
    model.to(device)
    objective = HeadObjective(model, head_config, cider_prototypes=means, device=device)
    tail_lr = head_config.lr * config.tail_lr_scale
    groups = [{"params": list(tail.parameters()), "lr": tail_lr, "base_lr": tail_lr},
              *objective.parameter_groups(head_config.lr)]
    optimizer = make_optimizer(groups, head_config)
    shuffle = torch.Generator().manual_seed(head_config.seed + 2)
    stream = TokenStream(store, batch_size=head_config.batch_size,
                         window_rows=config.window_rows, pin_memory=device.type == "cuda")

    partial = out / PARTIAL_DIR
    history: list[dict[str, Any]] = []
    first_epoch = 0
    if resume and partial.exists():
        tensors, saved = read_checkpoint_dir(partial, device=device, what="partial run",
                                             format=STATE_FORMAT)
        _check_same_run(saved, record, partial)
        parts = split_prefixes(tensors)
        tail.load_state_dict(parts["tail"], strict=True)
        model.load_state_dict(parts["model"], strict=True)
        load_optimizer_state(optimizer, parts.get("optimizer", {}), saved["optimizer_state"])
        objective.load_state(parts["objective"], saved["objective_state"])
        shuffle.set_state(parts["rng"]["shuffle"].cpu())
        history, first_epoch = list(saved["history"]), int(saved["epochs_done"])
        say(f"resuming {str(out)!r} after epoch {first_epoch}/{head_config.epochs}")

    amp = head_config.amp and device.type == "cuda"
    total_steps = stream.steps_per_epoch * head_config.epochs
    for epoch in range(first_epoch, head_config.epochs):
        model.train()
        tail.train()
        started = time.perf_counter()
        bar = tqdm(total=stream.n_rows, unit="img", unit_scale=True, leave=False,
                   desc=f"epoch {epoch + 1}/{head_config.epochs}",
                   disable=None if progress is None else not progress)
        sample_bar = _SampleProgress(bar)
        with bar:
            stats = run_epoch(
                objective, _tail_batches(stream, tail, shuffle, device, amp, sample_bar),
                optimizer, epoch=epoch, lr_at=lambda step: cosine_lr(1.0, step, total_steps),
                first_step=epoch * stream.steps_per_epoch, amp=head_config.amp,
                progress=sample_bar)
        seconds = time.perf_counter() - started
        entry = {"epoch": epoch + 1, **stats.summary(), "seconds": round(seconds, 3),
                 "samples_per_s": round(stats.seen / max(seconds, 1e-9), 1)}
        history.append(entry)
        say(_format_epoch(entry, head_config.epochs))
        save_partial(partial, {"tail": tail, "model": model}, optimizer, objective, shuffle,
                     {**record, "history": history, "epochs_done": epoch + 1},
                     format=STATE_FORMAT)

    tail.eval()
    model.eval()
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    # The tuned encoder's identity is the tail file's hash: the tail goes first, then the
    # head that names it.
    tail_config = save_tail(tail, out, {**record, "history": history, "created": created,
                                        "npos_version": __version__})
    write_checkpoint_dir(out / HEAD_DIR, model.state_dict(), {
        **head_record, "fingerprint": tail_config["fingerprint"], "history": history,
        "finetune": {"tail": TAIL_FILE, "sha256": tail_config["sha256"],
                     "token_layer": tail.layer, "base_fingerprint": record["base_fingerprint"]},
        "npos_version": __version__, "created": created})
    if partial.exists():
        shutil.rmtree(partial)
    say(f"wrote {str(out / TAIL_FILE)!r} and {str(out / HEAD_DIR)!r}")
    return tail_config, history, first_epoch


def _format_epoch(entry: Mapping[str, Any], epochs: int) -> str:
    parts = [f"epoch {entry['epoch']}/{epochs}", f"id_loss {entry['id_loss']:.4f}"]
    if entry["outlier_loss"] is not None:
        parts.append(f"outlier_loss {entry['outlier_loss']:.4f}")
    parts += [f"acc {entry['accuracy']:.4f}", f"{entry['samples_per_s']:.0f} img/s",
              f"{entry['seconds']:.1f}s"]
    return "  ".join(parts)
