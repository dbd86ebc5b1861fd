"""npos.encoder: the one home of open_clip loading, the config registry, the autocast policy
and the ViT split; npos.finetune uses it without importing npos.extract."""

import ast
import contextlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import npos.encoder
import npos.finetune
from npos.encoder import autocast, autocast_dtype
from npos.errors import ParameterError


def test_finetune_does_not_import_extract():
    code = ("import sys, npos.finetune; "
            "print(sorted(m for m in sys.modules if m.startswith('npos.extract')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # ... nor names it in any import statement (lazy imports inside functions included)
    for path in Path(npos.finetune.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("npos.extract") for n in names), (path, names)


def test_old_import_paths_are_the_new_objects():
    import npos.extract
    from npos.extract import encoder as enc

    for name in npos.encoder.__all__:
        assert getattr(enc, name) is getattr(npos.encoder, name), name
    for name in ("create_encoder", "load_encoder", "resolve_weights", "Weights",
                 "WeightsUnavailableError", "file_sha256", "encode_tokens_tail",
                 "encode_image_tokens", "register_model_configs", "image_transform",
                 "image_preprocess_config", "TINY_MODEL", "DEFAULT_SEED"):
        assert getattr(npos.extract, name) is getattr(npos.encoder, name), name
    assert enc.open_clip is open_clip  # tests patch open_clip through the old path


def test_tiny_config_lives_in_the_encoder_package():
    folder = Path(npos.encoder.__file__).parent / "model_configs"
    assert npos.encoder.MODEL_CONFIG_DIR == folder
    assert (folder / "npos-tiny.json").is_file()
    assert "npos-tiny" in open_clip.list_models()
    setup = (Path(npos.encoder.__file__).parents[2] / "setup.cfg").read_text()
    assert "encoder/model_configs/*.json" in setup


@pytest.mark.parametrize("bf16", [True, False])
def test_autocast_dtype_matches_the_store(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda = torch.device("cuda")
    # float16 store: fp16 keeps its 10 mantissa bits (bf16 would keep 7)
    for store in ("float16", np.float16, np.dtype("float16"), torch.float16):
        assert autocast_dtype(cuda, store) == torch.float16
    # float32 store: no 16-bit compute at all
    for store in ("float32", np.float32, torch.float32):
        assert autocast_dtype("cuda:0", store) is None
    # nothing stored: bf16 where supported
    assert autocast_dtype(cuda) == (torch.bfloat16 if bf16 else torch.float16)
    # the CPU never autocasts
    for store in (None, "float16", "float32"):
        assert autocast_dtype("cpu", store) is None
        assert isinstance(autocast("cpu", store), contextlib.nullcontext)
    with pytest.raises(ParameterError, match="The 'store_dtype' parameter must be one of"):
        autocast_dtype(cuda, "int8")


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_context_uses_the_chosen_dtype():
    # torch.autocast can be entered for "cuda" on a CPU-only build only to read its settings,
    # so check the context object rather than run CUDA kernels.
    ctx = autocast("cuda", "float16")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16
    assert isinstance(autocast("cuda", "float32"), contextlib.nullcontext)
