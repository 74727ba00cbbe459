"""The GGUF export run by llama.cpp itself (the optional `deploy` extra: pip install -e '.[deploy]').

Skipped where llama-cpp-python is not installed (CI installs only the dev extra; it builds llama.cpp from
source, minutes on 2 cores). tests/export/test_gguf.py checks the same files through transformers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill.export.gguf import write_gguf

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = "The capital of France is Paris. def f(x): return x"


@pytest.mark.parametrize(("gguf_type", "atol"), [("f32", 1e-3), ("f16", 1e-2)])
def test_llama_cpp_reads_the_file_as_torch_computes_it(tiny_teacher, tmp_path, gguf_type, atol):
    model, tok = tiny_teacher.model.eval(), tiny_teacher.tokenizer
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    file = write_gguf(model, tok, tmp_path / gguf_type, gguf_type)
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    # The tokenizer inside the file splits text as the student's does.
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    # Names, rotary row order and norms are right only if llama.cpp's logits are torch's (up to the type).
    assert np.abs(got - expected).max() < atol
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
