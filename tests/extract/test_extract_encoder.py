import hashlib

import open_clip
import pytest
import torch

from npos.errors import ParameterError
from npos.extract import encoder as enc
from npos.extract.encoder import (TINY_MODEL, Weights, WeightsUnavailableError, create_encoder,
                                  encode_image_tokens, encode_tokens_tail, load_encoder,
                                  resolve_weights)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_npos_tiny_is_registered_and_small():
    assert TINY_MODEL in open_clip.list_models()
    model = create_encoder(TINY_MODEL)
    assert sum(p.numel() for p in model.visual.parameters()) < 200_000
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = _state(create_encoder(TINY_MODEL, seed=0)), _state(create_encoder(TINY_MODEL))
    c = _state(create_encoder(TINY_MODEL, "none", seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resolve_weights_rules(tmp_path):
    assert resolve_weights(TINY_MODEL) == Weights(TINY_MODEL, None, "none")
    assert resolve_weights("ViT-B-32", "NONE").random_init
    with pytest.raises(ParameterError, match="say which weights 'ViT-B-32' should use.*openai"):
        resolve_weights("ViT-B-32")
    with pytest.raises(ParameterError, match="neither a pretrained tag of 'ViT-B-32'"):
        resolve_weights("ViT-B-32", "opnai")
    with pytest.raises(ParameterError, match="unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        resolve_weights("ViT-B-33", "none")
    with pytest.raises(ParameterError, match="pass --model hf-hub:org/repo"):
        resolve_weights("ViT-B-32", "hf-hub:org/repo")
    with pytest.raises(ParameterError, match="does not exist"):
        resolve_weights("ViT-B-32", str(tmp_path / "missing.pt"))
    hub = resolve_weights("hf-hub:org/repo")
    assert hub.checkpoint is None and hub.identity == "hf-hub:org/repo"
    with pytest.raises(ParameterError, match="--pretrained is not used with 'hf-hub:org/repo'"):
        resolve_weights("hf-hub:org/repo", "none")
    # OpenAI weights were trained with QuickGELU; the plain config must be built with it.
    openai = resolve_weights("ViT-B-16", "openai")
    assert openai.identity == "openai" and openai.quick_gelu
    assert not resolve_weights("ViT-B-16-quickgelu", "openai").quick_gelu


def test_download_failure_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': [Errno -2] Name or "
                           "service not known\nmore lines")

    monkeypatch.setattr(enc.open_clip, "create_model", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        create_encoder(Weights("ViT-B-32", "openai", "openai"))
    message = str(info.value)
    assert "\n" not in message
    assert "could not be downloaded" in message and "Name or service not known" in message
    assert "--pretrained PATH" in message and "--pretrained none" in message


def test_local_checkpoint_loads_and_is_identified_by_sha256(tmp_path):
    source = create_encoder(TINY_MODEL, seed=5)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    weights = resolve_weights(TINY_MODEL, str(path))
    assert weights.identity == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = create_encoder(weights, seed=0)  # the seed does not matter for loaded weights
    a, b = _state(source), _state(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot load checkpoint"):
        create_encoder(TINY_MODEL, str(tmp_path / "junk.pt"))


def test_load_encoder_gives_preprocess_and_tokenizer():
    model, preprocess, tokenizer = load_encoder(TINY_MODEL, device="cpu")
    from PIL import Image

    x = preprocess(Image.new("RGB", (50, 40), (200, 10, 10)))
    assert x.shape == (3, 32, 32)
    assert tokenizer(["a photo of a cat."]).shape == (1, 77)
    assert model.encode_image(x[None]).shape == (1, 32)


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_tokens_tail_reproduces_embeddings(layer):
    model = create_encoder(TINY_MODEL)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(layer))
    reference = model.encode_image(images)
    emb, tokens = encode_image_tokens(model.visual, images, layer)
    assert tokens.shape == (5, 17, 64)  # (32/8)^2 patches + class token, width 64
    assert torch.equal(emb, reference)
    torch.testing.assert_close(encode_tokens_tail(model.visual, tokens, layer), reference)
    # The stored tokens are float16; the tail from them stays close.
    from_half = encode_tokens_tail(model.visual, tokens.half(), layer)
    torch.testing.assert_close(from_half, reference, atol=2e-2, rtol=2e-2)


def test_tokens_layer_is_validated():
    model = create_encoder(TINY_MODEL)
    with pytest.raises(ParameterError, match=r"tokens_layer must be an int in \[0, 3\]"):
        encode_image_tokens(model.visual, torch.zeros(1, 3, 32, 32), 4)
