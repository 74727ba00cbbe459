"""The quantized student as a transformers TorchAoConfig folder that plain from_pretrained loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.compress.quant import schemes
from distill.config import ConfigError
from distill.export.torchao_hf import save_transformers_torchao
from tests.helpers import tiny_llama
from train import train

QUIET = ["eval.max_batches=1", "eval.tasks=[]", "eval.new_tokens=0", "eval.speed_runs=0"]


@pytest.mark.parametrize(
    ("scheme", "group_size", "modules", "skip"),
    [
        ("int4_weight_only", 32, ["linear", "embedding"], ["*norm*"]),
        ("int3_weight_only", 32, ["linear", "embedding"], ["*norm*"]),
        ("int8_weight_only", None, ["linear"], None),
        ("int8_dynact_int4_weight", 32, ["linear"], None),
    ],
)
def test_each_scheme_reloads_exactly_with_plain_from_pretrained(tmp_path, scheme, group_size, modules, skip):
    model = tiny_llama(vocab_size=512).eval()
    spec = schemes.make_spec(scheme, group_size, skip, modules=modules)
    schemes.ptq(model, spec)
    out = save_transformers_torchao(model, None, tmp_path / "q", spec)  # checks the reload itself, atol 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert schemes.is_quantized(reloaded.model.layers[1].mlp.down_proj.weight)
    embedding_quantized = "embedding" in modules
    assert schemes.is_quantized(reloaded.model.embed_tokens.weight) == embedding_quantized
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight  # tied again on load
    probe = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=probe).logits, model(input_ids=probe).logits)


def test_train_writes_the_torchao_folder_and_a_process_without_distill_loads_it(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"export.formats=\['hf', 'torchao'\]: torchao writes a student quantized"):
        train(tiny_cfg("export.formats=[hf,torchao]"))
    with pytest.raises(ConfigError, match=r"export.formats=\['hf', 'torchao'\]: torchao writes .* gguf_\* scheme"):
        train(tiny_cfg("export.formats=[hf,torchao]", "callbacks=qat", "callbacks.qat.scheme=gguf_q8_0"))
    cfg = tiny_cfg(
        "callbacks=qat", "callbacks/qat=int4_weight_only", "export.formats=[hf,torchao]", "trainer.max_steps=4", *QUIET
    )
    _, objects = train(cfg)
    out = tmp_path / "student_torchao"
    probe = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = objects["student"].eval()(input_ids=probe).logits
    torch.save({"probe": probe, "expected": expected}, tmp_path / "probe.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["distill"] = None  # any import of this package now fails
        import torch
        from transformers import AutoModelForCausalLM
        data = torch.load({str(tmp_path / "probe.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
        with torch.no_grad():
            assert torch.equal(model(input_ids=data["probe"]).logits, data["expected"])
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
    assert Path(objects["artifact_dir"]).name == "student_quantized"  # the packed form stays the smallest
