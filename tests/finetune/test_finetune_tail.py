"""VisionTail: reproduces the extraction from cached tokens; holds only the tail's state."""

from __future__ import annotations

import json

import pytest
import torch

from npos.extract import create_encoder
from npos.finetune import TailError, VisionTail, load_tail, read_tail_config, save_tail
from npos.store import FeatureStore

LAYER = 1


@pytest.fixture(scope="module")
def clip():
    return create_encoder("npos-tiny")


def test_tail_with_original_weights_reproduces_stored_embeddings(token_stores, clip):
    store = FeatureStore.open(token_stores["train"])
    tokens = store.read("tokens", as_torch=True)           # float16, as cached
    assert tokens.dtype == torch.float16 and tokens.shape[1:] == (17, 64)
    stored = store.read("embeddings", as_torch=True)        # float32 store
    tail = VisionTail(clip.visual, store.attrs["token_layer"]).eval()
    with torch.no_grad():
        z = tail(tokens)
    assert z.shape == stored.shape == (72, 32)
    # Only the float16 rounding of the cached tokens separates the two.
    torch.testing.assert_close(z, stored, atol=2e-3, rtol=2e-3)
    cos = torch.nn.functional.cosine_similarity(z, stored)
    assert cos.min() > 0.9999


def test_tail_state_is_only_the_tail(clip):
    tail = VisionTail(clip.visual, LAYER)
    keys = set(tail.state_dict())
    blocks = {int(k.split(".")[3]) for k in keys if k.startswith("visual.transformer.resblocks.")}
    assert blocks == {1, 2}                                  # blocks 0..L-1 are not there
    assert {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"} <= keys
    for frozen in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
        assert not any(k.startswith(f"visual.{frozen}") for k in keys), frozen
    # Exactly the parameters of blocks 1-2, ln_post and proj of the original tower.
    visual = clip.visual
    expected = (sum(p.numel() for b in visual.transformer.resblocks[LAYER:] for p in b.parameters())
                + sum(p.numel() for p in visual.ln_post.parameters()) + visual.proj.numel())
    assert sum(p.numel() for p in tail.parameters()) == expected
    assert all(p.requires_grad for p in tail.parameters())
    # The source encoder stays frozen and shares no storage with the tail.
    assert not any(p.requires_grad for p in clip.parameters())
    src = {p.data_ptr() for p in clip.parameters()}
    assert not src & {p.data_ptr() for p in tail.parameters()}


def test_tail_keys_drop_into_a_full_clip(clip):
    tail = VisionTail(clip.visual, LAYER)
    with torch.no_grad():
        tail.visual.proj.add_(1.0)
    other = create_encoder("npos-tiny", seed=1)
    missing, unexpected = other.load_state_dict(tail.state_dict(), strict=False)
    assert not unexpected
    torch.testing.assert_close(other.visual.proj, tail.visual.proj)


@pytest.mark.parametrize("layer", [0, 3])
def test_tail_at_the_extremes(clip, layer):
    images = torch.rand(2, 3, 32, 32)
    from npos.extract import encode_image_tokens

    with torch.no_grad():
        emb, tokens = encode_image_tokens(clip.visual, images, layer)
        tail = VisionTail(clip.visual, layer)
        torch.testing.assert_close(tail(tokens), emb)
    assert len([k for k in tail.state_dict() if "resblocks" in k]) == (3 - layer) * 12


def test_tail_layer_is_validated(clip):
    from npos.errors import ParameterError

    with pytest.raises(ParameterError, match=r"tokens_layer must be an int in \[0, 3\]"):
        VisionTail(clip.visual, 4)


def test_save_and_load_tail_roundtrip(tmp_path, clip):
    tail = VisionTail(clip.visual, LAYER)
    with torch.no_grad():
        tail.visual.ln_post.weight.mul_(1.5)
    base = {"model": "npos-tiny", "pretrained": "none", "preprocess": None, "dim": 32}
    config = save_tail(tail, tmp_path, {"model": "npos-tiny", "pretrained": "none",
                                        "base_fingerprint": base})
    assert config["fingerprint"] == {**base, "pretrained": f"none+finetune:{config['sha256']}"}
    loaded, desc = load_tail(tmp_path)
    assert desc == json.loads((tmp_path / "tail.json").read_text())
    tokens = torch.randn(3, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), tail(tokens))

    # A weights file that is not the one tail.json describes is refused.
    with torch.no_grad():
        tail.visual.proj.zero_()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tail.state_dict().items()},
              str(tmp_path / "tail.safetensors"))
    with pytest.raises(TailError, match="sha256 differs"):
        read_tail_config(tmp_path)
    (tmp_path / "tail.json").unlink()
    with pytest.raises(TailError, match="tail.json is missing"):
        load_tail(tmp_path)
