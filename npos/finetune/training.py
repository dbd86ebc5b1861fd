"""`finetune`: train the tail of the open_clip ViT together with a head, from cached tokens.

The objective is exactly ``train-head``'s (:class:`npos.train_head.HeadObjective`: ID loss on
the cosine logits + λ · balanced BCE of the OOD head against outliers synthesized online in the
projected space), and so is the trainer (:class:`npos.train_head.trainer.Trainer`: epochs,
cosine learning-rate schedule, bfloat16 autocast on CUDA, float32 master weights, resume,
atomic checkpoints, epoch log). Fine-tuning contributes an extra module to train, the
:class:`~npos.finetune.tail.VisionTail`, and its batch source: every batch of cached tokens
(:class:`~npos.finetune.tokens.TokenStream`) runs through the tail, and the gradient of the
loss flows into it.

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

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npos.errors import IncompatibleStoreError, ParameterError
from npos.device import resolve_device
from npos.encoder import DEFAULT_SEED, create_encoder, resolve_weights
from npos.finetune.config import (HEAD_DIR, PARTIAL_DIR, FinetuneConfig, FinetuneResult,
                                  parse_embed_specs)
from npos.finetune.embedding import embed_store, embedded_attrs
from npos.finetune.tail import (TAIL_CONFIG, TAIL_FILE, TailError, VisionTail, load_tail_weights,
                                read_tail_config, save_tail)
from npos.finetune.tokens import TokenSpec, TokenStream, check_same_tokens, token_spec
from npos.store import FeatureStore
from npos.store.lock import WriterLock
from npos.settings import settings_record
from npos.train_head import HeadConfig, HeadObjective
from npos.train_head.checkpoint import (FORMAT as HEAD_FORMAT, CheckpointExistsError,
                                        read_checkpoint_dir, write_checkpoint_dir)
from npos.train_head.data import (LabeledFeatures, build_head, check_class_counts, head_record,
                                  load_labeled)
from npos.train_head.trainer import Trainer, check_same_settings, run_epoch, run_stamp

STATE_FORMAT = "npos.finetune-state/1"


# ---------------------------------------------------------------------- inputs
def _open_token_store(url: str, what: str) -> tuple[FeatureStore, TokenSpec]:
    store = FeatureStore.open(url, kinds=("features",), what="finetune")
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


def _check_settings(head_config: HeadConfig, config: FinetuneConfig, *, overwrite: bool,
                    resume: bool) -> None:
    head_config.validate()
    config.validate()
    if head_config.id_loss == "none" and head_config.detach_head:
        raise ParameterError(
            "with id_loss='none' and a detached OOD head no loss reaches the tail, so "
            "fine-tuning would change nothing; choose an ID loss or --no-detach-head")
    if overwrite and resume:
        raise ParameterError("pass either --overwrite or --resume, not both")


def _outputs(out: Path, names) -> list[Path]:
    return [out / TAIL_FILE, out / TAIL_CONFIG, out / HEAD_DIR, out / PARTIAL_DIR,
            *(out / f"{name}.zarr" for name in names)]


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@dataclass
class _Inputs:
    """Everything :func:`finetune` reads and checks before it writes anything."""

    store: FeatureStore
    spec: TokenSpec
    weights: Any
    sources: dict[str, FeatureStore]
    data: LabeledFeatures
    tail: VisionTail


def _prepare(train_store: str, out: Path, model: str, pretrained: str | None,
             head_config: HeadConfig, embed: Mapping[str, str], *, overwrite: bool,
             resume: bool) -> _Inputs:
    """Validate every input before anything is read in bulk, removed or written; then clear
    the outputs ``overwrite`` replaces."""
    store, spec = _open_token_store(train_store, "training store")
    weights = _check_encoder(store, model, pretrained)
    sources: dict[str, FeatureStore] = {}
    for name, url in embed.items():
        what = f"--embed store {name!r} ({url!r})"
        other, other_spec = _open_token_store(url, what)
        check_same_tokens(spec, other_spec, what=what,
                          reference=f"the training store {store.url!r}")
        sources[name] = other
    existing = [p for p in _outputs(out, embed) if p.exists()]
    if existing and not (overwrite or resume):
        shown = ", ".join(repr(str(p)) for p in existing[:4])
        raise CheckpointExistsError(f"{shown} already exist(s); pass --overwrite to replace, or "
                                    "--resume to continue an interrupted run")
    data = load_labeled(store)
    check_class_counts(data, head_config, store.url)
    seed_attr = store.attrs.get("seed")
    clip: Any = create_encoder(weights, seed=DEFAULT_SEED if seed_attr is None else int(seed_attr))
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
    return _Inputs(store, spec, weights, sources, data, tail)


def _run_record(inputs: _Inputs, head_config: HeadConfig,
                config: FinetuneConfig) -> dict[str, Any]:
    """What decides the trained tail and head (a resumed run must match it)."""
    store, weights = inputs.store, inputs.weights
    return {
        "model": weights.model, "pretrained": weights.identity,
        "quick_gelu": weights.quick_gelu, "seed_init": store.attrs.get("seed"),
        "token_shape": list(inputs.spec.shape), "preprocess": store.attrs.get("preprocess"),
        "dim": store.dim, "train_store": store.url, "base_fingerprint": store.fingerprint(),
        # What decides the trained weights; embed_batch_size does not, so a resumed run may
        # change it.
        "head_config": head_config.to_dict(),
        "finetune": {"tail_lr_scale": config.tail_lr_scale, "window_rows": config.window_rows},
        "token_layer": inputs.spec.layer,
    }


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
        While the run writes, ``.<OUT>.lock`` beside ``out_dir`` names this process; a
        second run into the same folder is refused.
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
    # Over ~60 lines by its docstring only (the body is ~25 lines of wiring).
    head_config = head_config or HeadConfig()
    config = config or FinetuneConfig()
    _check_settings(head_config, config, overwrite=overwrite, resume=resume)
    embed = parse_embed_specs(embed or {})
    device = resolve_device(device)
    say = log or (lambda line: None)
    out = Path(out_dir)
    with WriterLock(out, what="fine-tuning output folder"):  # one writer of OUT/ at a time
        inputs = _prepare(train_store, out, model, pretrained, head_config, embed,
                          overwrite=overwrite, resume=resume)
        settings = settings_record(train_store=inputs.store.url, out_dir=str(out),
                                   model=model, pretrained=pretrained, embed=dict(embed),
                                   device=str(device), head_config=head_config,
                                   finetune=config)
        return _finetune_locked(inputs, out, settings, head_config, config, device,
                                resume=resume, progress=progress, say=say)


def _finetune_locked(inputs: _Inputs, out: Path, settings: dict[str, Any],
                     head_config: HeadConfig, config: FinetuneConfig, device: torch.device,
                     *, resume: bool, progress: bool | None,
                     say: Callable[[str], None]) -> FinetuneResult:
    """Train (or take the finished training) and re-embed, holding the lock of ``out``."""
    record = _run_record(inputs, head_config, config)

    # ---- training (or its saved result, when resuming after it finished)
    tail_config = _finished(out, inputs.tail, record) if resume else None
    if tail_config is not None:
        history, first_epoch = list(tail_config["history"]), head_config.epochs
        say(f"training already finished in {str(out)!r}; re-embedding what is left")
    else:
        tail_config, history, first_epoch = _train(
            inputs, record, settings, head_config, config, out, device,
            resume=resume, progress=progress, say=say)
    stores = _reembed(inputs, tail_config, out, config, device, resume=resume,
                      progress=progress, say=say)
    return FinetuneResult(str(out), tail_config, str(out / HEAD_DIR), stores, history,
                          first_epoch)


def _reembed(inputs: _Inputs, tail_config: Mapping[str, Any], out: Path,
             config: FinetuneConfig, device: torch.device, *, resume: bool,
             progress: bool | None, say: Callable[[str], None]) -> dict[str, str]:
    """Write every ``--embed`` store, re-embedded by the tuned tail, as ``OUT/NAME.zarr``."""
    stores: dict[str, str] = {}
    for name, source in inputs.sources.items():
        url = str(out / f"{name}.zarr")
        attrs = embedded_attrs(source, tail_config["fingerprint"]["pretrained"],
                               {"tail": str((out / TAIL_FILE).resolve()),
                                "sha256": tail_config["sha256"],
                                "token_layer": inputs.spec.layer})
        embed_store(inputs.tail.to(device), source, url, attrs=attrs,
                    batch_size=config.embed_batch_size, device=device, resume=resume,
                    progress=progress)
        stores[name] = url
        say(f"re-embedded {source.url!r} -> {url!r}")
    return stores


def _finished(out: Path, tail: VisionTail, record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tail's description of a run whose training finished (its weights loaded into
    ``tail``), checked to have this run's settings and to belong with the head beside it;
    None if training has not finished."""
    if not (out / TAIL_CONFIG).exists():
        return None
    # Read as is: a run killed between writing the weights and tail.json leaves a
    # description of older weights, which the partial state replaces.
    check_same_settings(json.loads((out / TAIL_CONFIG).read_text(encoding="utf-8")), record,
                        out / TAIL_CONFIG)
    if not (out / HEAD_DIR).exists():
        return None
    tail_config = read_tail_config(out)
    _, head_saved = read_checkpoint_dir(out / HEAD_DIR)
    if head_saved.get("fingerprint") != tail_config["fingerprint"]:
        raise TailError(f"{str(out / HEAD_DIR)!r} was not trained with "
                        f"{str(out / TAIL_FILE)!r}; pass --overwrite to start over")
    load_tail_weights(tail, out)
    return tail_config


class _TailBatches:
    """Fine-tuning's batch source: shuffled batches of cached tokens, embedded by the
    trainable tail (graph attached, so the loss's gradient reaches it)."""

    def __init__(self, stream: TokenStream, tail: VisionTail, device: torch.device,
                 amp: bool) -> None:
        self.stream, self.tail, self.device, self.amp = stream, tail, device, amp
        self.n_rows, self.steps_per_epoch = stream.n_rows, stream.steps_per_epoch

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for tokens, labels in self.stream.epoch(generator):
            tokens = tokens.to(self.device, non_blocking=True).float()
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                enabled=self.amp):
                z = self.tail(tokens)
            yield z, labels.to(self.device, non_blocking=True)


def _train(inputs: _Inputs, record: dict[str, Any], settings: dict[str, Any],
           head_config: HeadConfig, config: FinetuneConfig, out: Path, device: torch.device,
           *, resume: bool, progress: bool | None,
           say: Callable[[str], None]) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Train the tail and a head with the shared trainer; write both. Returns the tail's
    description, the history and the number of epochs done before this run."""
    data, tail = inputs.data, inputs.tail.to(device)
    model, means = build_head(data, head_config)
    model.to(device)
    objective = HeadObjective(model, head_config, cider_prototypes=means, device=device)
    # epoch_fn: this module's run_epoch, looked up now, so a test can interrupt a run.
    trainer = Trainer(objective, partial=out / PARTIAL_DIR, record=record,
                      extra={"tail": (tail, config.tail_lr_scale)}, state_format=STATE_FORMAT,
                      name=str(out), per_sample=True, progress=progress, log=say,
                      epoch_fn=run_epoch)
    if resume:
        trainer.resume()
    stream = TokenStream(inputs.store, batch_size=head_config.batch_size,
                         window_rows=config.window_rows, pin_memory=device.type == "cuda")
    source = _TailBatches(stream, tail, device, head_config.amp and device.type == "cuda")

    def save(history: list[dict[str, Any]]) -> dict[str, Any]:
        stamp = run_stamp()
        # The tuned encoder's identity is the tail file's hash: the tail goes first, then
        # the head that names it.
        tail_config = save_tail(tail, out, {**record, "history": history, **stamp})
        write_checkpoint_dir(out / HEAD_DIR, model.state_dict(), {
            "format": HEAD_FORMAT,
            **head_record(head_config, data, train_store=inputs.store.url,
                          fingerprint=tail_config["fingerprint"]),
            "history": history,
            "finetune": {"tail": TAIL_FILE, "sha256": tail_config["sha256"],
                         "token_layer": tail.layer,
                         "base_fingerprint": record["base_fingerprint"]},
            **stamp, "settings": settings})
        return tail_config

    tail_config = trainer.fit(source, save=save)
    say(f"wrote {str(out / TAIL_FILE)!r} and {str(out / HEAD_DIR)!r}")
    return tail_config, trainer.history, trainer.first_epoch


#: Old import paths keep working: these names moved to npos.finetune.config and
#: npos.train_head.data.
__all__ = ["FinetuneConfig", "FinetuneResult", "build_head", "finetune", "parse_embed_specs"]
