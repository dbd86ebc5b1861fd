"""Fine-tuning from cached tokens: how fast tokens stream out of a store, and what caching
the frozen blocks saves per training step.

1. Streaming (rows/s) over a token store shaped like ViT-B/16's cache after block 10
   (197 x 768 float16 per row): :class:`npos.finetune.TokenStream` (shuffled blocks +
   in-window permutation, read-ahead thread) against the baseline a random sampler would
   do — every batch gathers random rows from the whole array — and against one plain
   sequential pass (the I/O ceiling).
2. Training step (samples/s, forward + backward + AdamW step) of ViT-B/16's last 2 blocks:
   from cached tokens (:class:`npos.finetune.VisionTail`) against the same step from
   images, where the 10 frozen blocks must run first (under no_grad).

Random-init weights (no download) and random tokens: speed does not depend on the values.

    python -m benchmarks.finetune [--rows 1024] [--batch-size 64] [--steps 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def make_store(url: str, rows: int, *, seed: int = 0):
    from npos.store import FeatureStore

    rng = np.random.default_rng(seed)
    store = FeatureStore.create(url, n_rows=rows, dim=512, chunk_rows=512,
                                class_names=[f"c{i}" for i in range(10)],
                                attrs={"model": "bench", "pretrained": "none", "token_layer": 10})
    # 128-row token chunks: what extraction picks for ViT-B/16 rows under its 64 MB cap.
    store.add_array("tokens", (197, 768), "float16", chunk_rows=128)
    for index in range(store.n_chunks):
        part = store.chunk_slice(index)
        n = part.stop - part.start
        store.write_chunk(index, embeddings=rng.normal(size=(n, 512)).astype("float16"),
                          labels=rng.integers(0, 10, n).astype("int32"),
                          tokens=rng.normal(size=(n, 197, 768)).astype("float16"))
    return store


def rate(rows: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return rows / (time.perf_counter() - start)


def bench_streaming(rows: int, batch_size: int) -> None:
    from npos.finetune import TokenStream

    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(f"{tmp}/tokens.zarr", rows)
        tokens = store.array("tokens")

        def sequential():
            for start in range(0, rows, 128):
                np.asarray(tokens[start:start + 128])

        def random_rows():
            order = np.random.default_rng(0).permutation(rows)
            for start in range(0, rows, batch_size):
                np.asarray(tokens.oindex[np.sort(order[start:start + batch_size])])

        stream = TokenStream(store, batch_size=batch_size)

        def streamed():
            for _ in stream.epoch(torch.Generator().manual_seed(0)):
                pass

        base = rate(rows, random_rows)
        seq = rate(rows, sequential)
        ours = rate(rows, streamed)
        mb = rows * 197 * 768 * 2 / 2**20
        print(f"streaming {rows} rows ({mb:.0f} MB of float16 tokens), batch {batch_size}")
        print(f"  random-row gather (baseline): {base:8.0f} rows/s  1.00x")
        print(f"  TokenStream                 : {ours:8.0f} rows/s  {ours / base:.2f}x")
        print(f"  sequential pass (ceiling)   : {seq:8.0f} rows/s  {seq / base:.2f}x")


def measure_step(batch_size: int, steps: int, *, device: str = "cpu", model: str = "ViT-B-16",
                 layer: int = 10, amp: bool | None = None) -> dict:
    """Training-step throughput of the tail from cached tokens vs from images.

    ``amp`` (default: on CUDA) runs forward passes under bfloat16 autocast, as fine-tuning
    does. Returns samples/s of both and their ratio ``cached_over_images``.
    """
    from npos.encoder import create_encoder, encode_image_tokens
    from npos.finetune import VisionTail

    device = torch.device(device)
    amp = device.type == "cuda" if amp is None else amp
    clip = create_encoder(model, "none").to(device)
    visual = clip.visual
    tail = VisionTail(visual, layer).train()
    opt = torch.optim.AdamW(tail.parameters(), lr=1e-5)
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    images = torch.randn(batch_size, 3, size, size, device=device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    with torch.no_grad(), autocast():
        _, tokens = encode_image_tokens(visual, images, layer)

    def step(get_tokens):
        with autocast():
            z = tail(get_tokens())
            loss = z.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def from_images():
        with torch.no_grad(), autocast():
            return encode_image_tokens(visual, images, layer)[1]

    def timed_rate(get):
        def run():
            for _ in range(steps):
                step(get)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return rate(batch_size * steps, run)

    for get in (lambda: tokens, from_images):   # warm-up
        step(get)
    cached = timed_rate(lambda: tokens)
    full = timed_rate(from_images)
    return {"model": model, "layer": layer, "batch_size": batch_size, "steps": steps,
            "device": str(device), "amp": amp, "threads": torch.get_num_threads(),
            "images_samples_per_s": full, "cached_samples_per_s": cached,
            "cached_over_images": cached / full}


def bench_step(batch_size: int, steps: int) -> None:
    r = measure_step(batch_size, steps)
    print(f"ViT-B/16 tail (blocks 10-11 + ln_post + proj), batch {batch_size}, {steps} steps, "
          f"{r['threads']} threads")
    print(f"  from images (10 frozen blocks first, baseline): "
          f"{r['images_samples_per_s']:7.1f} samples/s  1.00x")
    print(f"  from cached tokens (VisionTail)               : "
          f"{r['cached_samples_per_s']:7.1f} samples/s  {r['cached_over_images']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--step-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    bench_streaming(args.rows, args.batch_size)
    bench_step(args.step_batch_size, args.steps)


if __name__ == "__main__":
    main()
