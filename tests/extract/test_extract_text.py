import numpy as np
import pytest
import torch

from npos.errors import ParameterError
from npos.extract import load_encoder
from npos.extract.text import DEFAULT_TEMPLATES, load_templates, text_embeddings


@pytest.fixture(scope="module")
def tiny_text():
    model, _, tokenizer = load_encoder("npos-tiny")
    return model, tokenizer


def test_default_templates_are_the_papers_18():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(DEFAULT_TEMPLATES) == 18 == len(set(DEFAULT_TEMPLATES))
    assert DEFAULT_TEMPLATES[0] == "a photo of a {}."
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    openai = {f("{}") for f in OPENAI_IMAGENET_TEMPLATES}
    assert sum(t in openai for t in DEFAULT_TEMPLATES) == 12  # as documented


def test_text_embeddings_are_unit_prompt_ensembles(tiny_text):
    model, tokenizer = tiny_text
    names = ["cat", "dog", "red fox"]
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    text = text_embeddings(model, tokenizer, names, templates, batch_size=4)
    assert text.shape == (3, 32) and text.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-6)
    # By hand for one class: normalize each prompt, average, normalize.
    with torch.no_grad():
        per = model.encode_text(tokenizer([t.replace("{}", "red fox") for t in templates]))
    per = torch.nn.functional.normalize(per, dim=-1).mean(0)
    np.testing.assert_allclose(text[2], torch.nn.functional.normalize(per, dim=0).numpy(),
                               atol=1e-6)
    swapped = text_embeddings(model, tokenizer, names[::-1], templates)
    np.testing.assert_allclose(swapped, text[::-1], atol=1e-6)


def test_templates_file(tmp_path):
    (tmp_path / "t.txt").write_text("# mine\na {} in the wild.\n\nan origami {}.\n")
    assert load_templates(tmp_path / "t.txt") == ["a {} in the wild.", "an origami {}."]
    (tmp_path / "bad.txt").write_text("a photo.\n")
    with pytest.raises(ParameterError, match=r"must contain '\{\}' exactly once"):
        load_templates(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ParameterError, match="has no templates"):
        load_templates(tmp_path / "empty.txt")
