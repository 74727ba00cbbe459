"""Bad input, table-driven: each gives one ConfigError line naming the field, the value and the fix, and no file.

Every case runs ``train()`` on the tiny config with one bad setting or one bad data file, as a new user
would type it. ``test_train.py::test_cli_bad_value_gives_one_line_error`` checks that the command line turns
such an error into one ``error:`` line and exit code 2.
"""

# ruff: noqa: E501  (the table reads best one case per line)
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distill.config import ConfigError
from train import train

# name → (file contents written under the case's data folder, as {file name: text} or None)
FILES: dict[str, str | bytes] = {
    "good.txt": "The quick brown fox jumps over the lazy dog.\n" * 40,
    "empty.txt": "",
    "blank.txt": "\n\n   \n",
    "broken.jsonl": '{"text": "hello world"}\n{"text": "broken\n{"text": "ok"}\n',
    "array.json": json.dumps([{"text": "a"}, {"text": "b"}])[:-3],  # cut short: not valid JSON
    "empty_array.json": "[]",
    "other_column.jsonl": '{"content": "hello"}\n',
    "numbers.jsonl": '{"text": 5}\n{"text": 6}\n',
    "garbage.parquet": "not a parquet file",
    "other_column.csv": "a,b\n1,2\n",
}

# (id, overrides, expected start of the message). {d} is the folder holding FILES.
CASES: list[tuple[str, list[str], str]] = [
    # data: files, formats, columns
    ("glob_matches_nothing", ["data=text", "data.files={d}/nomatch*.txt"], r"data.files='.*nomatch\*.txt': the pattern matches no file"),
    ("missing_file", ["data=text", "data.files={d}/missing.txt"], r"data.files='.*missing.txt': no such file"),
    ("empty_file", ["data=text", "data.files={d}/empty.txt"], r"data.files='.*empty.txt': the file is empty"),
    ("blank_file", ["data=text", "data.files={d}/blank.txt"], r"data.block_size=32: the corpus has \d+ tokens in \d+ documents, too few"),
    ("broken_jsonl_line", ["data=text", "data.files={d}/broken.jsonl"], r"data.files='.*broken.jsonl': line 2 of .*broken.jsonl is not valid JSON"),
    ("broken_json_array", ["data=text", "data.files={d}/array.json"], r"data.files='.*array.json': .*array.json is not valid JSON \(line 1"),
    ("empty_json_array", ["data=text", "data.files={d}/empty_array.json"], r"data.files='.*empty_array.json': .* holds no rows"),
    ("missing_column_jsonl", ["data=text", "data.files={d}/other_column.jsonl"], r"data.text_field='text': no such column; the data has \['content'\]"),
    ("missing_column_csv", ["data=text", "data.files={d}/other_column.csv"], r"data.text_field='text': no such column; the data has \['a', 'b'\]"),
    ("text_field_names_another_column", ["data=text", "data.files={d}/other_column.jsonl", "data.text_field=body"], r"data.text_field='body': no such column"),
    ("numbers_not_text", ["data=text", "data.files={d}/numbers.jsonl"], r"data.text_field='text': the column holds \w+ values, not text"),
    ("corrupt_parquet", ["data=text", "data.files={d}/garbage.parquet"], r"data.files='.*garbage.parquet': could not read the files as parquet"),
    ("folder_not_files", ["data=text", "data.files={d}"], r"data.files='.*': is a folder; name the files in it"),
    ("mixed_kinds", ["data=text", "data.files=[{d}/good.txt,{d}/other_column.jsonl]"], r"data.files=\[.*\]: use one kind of file among"),
    ("unknown_suffix", ["data=text", "data.files={d}/notes.docx"], r"data.files='.*notes.docx': use one kind of file among"),
    ("files_not_given", ["data=text"], r"data.files=None: give a file, a glob or a list"),
    ("hub_name_not_given", ["data=hub"], r"data.name=None: give a hub dataset id"),
    ("unknown_source", ["data.source=web"], r"data.source='web': choose one of"),
    # data: sizes
    ("block_size_one", ["data.block_size=1"], r"data.block_size=1: must be at least 2 tokens"),
    ("block_size_huge", ["data.block_size=100000000"], r"data.block_size=100000000: the corpus has \d+ tokens"),
    ("val_fraction_zero", ["data.val_fraction=0"], r"data.val_fraction=0: must lie strictly between 0 and 1"),
    ("val_fraction_above_one", ["data.val_fraction=1.5"], r"data.val_fraction=1.5: must lie strictly between 0 and 1"),
    ("test_fraction_zero", ["data.test_fraction=0"], r"data.test_fraction=0: must lie strictly between 0 and 1"),
    ("no_text_left_to_train", ["data.val_fraction=0.5", "data.test_fraction=0.5"], r"data.test_fraction=0.5: with data.val_fraction=0.5 it leaves no training text"),
    ("batch_size_zero", ["data.batch_size=0"], r"data.batch_size=0: must be at least 1"),
    ("eval_batch_size_zero", ["data.eval_batch_size=0"], r"data.eval_batch_size=0: must be at least 1, or null"),
    ("num_workers_negative", ["data.num_workers=-1"], r"data.num_workers=-1: must be 0 .* or more"),
    # optimizer and scheduler arguments
    ("lr_negative", ["distill.optimizer.lr=-1"], r"distill.optimizer: Invalid learning rate: -1; fix this setting"),
    ("lr_not_a_number", ["distill.optimizer.lr=abc"], r"distill.optimizer: .*'str'; fix this setting"),
    ("weight_decay_negative", ["distill.optimizer.weight_decay=-0.1"], r"distill.optimizer: Invalid weight_decay value: -0.1"),
    ("beta_above_one", ["distill.optimizer.betas=[1.5,0.9]"], r"distill.optimizer: Invalid beta parameter at index 0: 1.5"),
    ("eps_negative", ["+distill.optimizer.eps=-1"], r"distill.optimizer: Invalid epsilon value: -1"),
    ("optimizer_unknown_argument", ["+distill.optimizer.momentum=0.9"], r"distill.optimizer: .*unexpected keyword argument 'momentum'"),
    ("optimizer_unknown_class", ["distill.optimizer._target_=torch.optim.Nope"], r"distill.optimizer: .*Nope"),
    ("warmup_negative", ["distill.scheduler.num_warmup_steps=-5"], r"distill.scheduler.num_warmup_steps=-5: must be 0 or more steps"),
    ("scheduler_unknown_argument", ["+distill.scheduler.bogus=1"], r"distill.scheduler: .*unexpected keyword argument 'bogus'"),
    ("scheduler_unknown_name", ["distill.scheduler._target_=transformers.get_scheduler", "+distill.scheduler.name=wiggly"], r"distill.scheduler: .*wiggly"),
    # objective
    ("alpha_above_one", ["distill.objective.alpha=2"], r"distill.objective.alpha=2: alpha must lie in \[0, 1\]"),
    ("temperature_zero", ["distill.objective.temperature=0"], r"distill.objective.temperature=0: temperature must be > 0"),
    ("unknown_loss", ["distill.objective.loss=kl"], r"distill.objective.loss='kl': unknown loss; choose one of"),
    ("beta_outside", ["distill.objective.beta=2"], r"distill.objective.beta=2: beta must lie in \[0, 1\]"),
    ("skew_one", ["distill.objective.skew=1"], r"distill.objective.skew=1: skew must lie in \[0, 1\)"),
    ("chunk_size_zero", ["distill.objective.chunk_size=0"], r"distill.objective.chunk_size=0: must be at least 1"),
    ("chunked_not_a_choice", ["distill.objective.chunked=maybe"], r"distill.objective.chunked='maybe': choose true, false or auto"),
    # trainer, seed, resume
    ("max_steps_negative", ["trainer.max_steps=-5"], r"trainer.max_steps=-5: give a step count, or -1"),
    ("precision_unknown", ["trainer.precision=99"], r"trainer: Precision 99 is invalid"),
    ("val_check_interval_negative", ["trainer.val_check_interval=-1"], r"trainer: You have passed invalid value -1 for val_check_interval"),
    ("accumulate_zero", ["trainer.accumulate_grad_batches=0"], r"trainer.accumulate_grad_batches=0: must be a positive integer"),
    ("clip_negative", ["trainer.gradient_clip_val=-1"], r"trainer.gradient_clip_val=-1: must be 0 or more"),
    ("seed_not_an_integer", ["seed=abc"], r"seed='abc': give an integer seed"),
    ("resume_missing", ["resume={d}/nope.ckpt"], r"resume='.*nope.ckpt'.*no such checkpoint"),
    # student
    ("zero_layers", ["student.num_layers=0"], r"student.num_layers=0: must be a positive integer"),
    ("negative_width", ["student.hidden_size=-1"], r"student.hidden_size=-1: must be a positive integer"),
    ("heads_do_not_divide", ["student.num_heads=3"], r"student.num_heads=3: must divide student.hidden_size=32"),
    # callbacks
    ("unknown_qat_scheme", ["callbacks=qat", "callbacks.qat.scheme=int7"], r"callbacks.qat.scheme='int7': unknown quantization scheme"),
    ("share_group_zero", ["callbacks=share", "callbacks.share.group_size=0"], r"callbacks.share.group_size=0: must be a positive divisor"),
    ("checkpoint_every_negative", ["callbacks.model_checkpoint.every_n_train_steps=-1"], r"callbacks.model_checkpoint: Invalid value for every_n_train_steps=-1"),
    ("gguf_type_unknown", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.gguf_types={{*:q9_9}}"], r"callbacks.qat.gguf_types=\{'\*': 'q9_9'\}: unknown llama.cpp type"),
    ("gguf_glob_matches_nothing", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.gguf_types={{*.layers.13.mlp.down_proj:q4_k}}"], r"callbacks.qat.gguf_types=.*: the glob matches no quantized module"),
    ("target_ratio_below_one", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.target_ratio=0.5"], r"callbacks.qat.target_ratio=0.5: give how many times smaller"),
    ("target_ratio_with_act_quant", ["callbacks=qat", "+callbacks.qat.target_ratio=7"], r"callbacks.qat.target_ratio=7: chooses among weight-only grids; int8_dynact_int4_weight quantizes activations"),
    ("target_ratio_and_types", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.target_ratio=7", "+callbacks.qat.gguf_types={{*:q8_0}}"], r"callbacks.qat.target_ratio=7: and callbacks.qat.gguf_types both choose"),
    ("target_bytes_negative", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.target_bytes=-5"], r"callbacks.qat.target_bytes=-5: give a whole number of bytes > 0"),
    ("target_bytes_and_ratio", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.target_ratio=7", "+callbacks.qat.target_bytes=1000"], r"callbacks.qat.target_bytes=1000: and target_ratio=7 both set the budget"),
    ("target_bytes_float", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.target_bytes=6.7e7"], r"callbacks.qat.target_bytes=67000000.0: give a whole number of bytes > 0"),
    ("target_bytes_with_act_quant", ["callbacks=qat", "+callbacks.qat.target_bytes=1000"], r"callbacks.qat.target_bytes=1000: chooses among weight-only grids"),
    ("target_bytes_and_module_schemes", ["callbacks=qat", "callbacks.qat.scheme=int3_weight_only", "+callbacks.qat.target_bytes=1000", "+callbacks.qat.module_schemes={{lm_head:int4_weight_only}}"], r"callbacks.qat.target_bytes=1000: and callbacks.qat.module_schemes both choose the grids"),
    ("budget_grids_without_budget", ["callbacks=qat", "callbacks.qat.scheme=int3_weight_only", "+callbacks.qat.budget_grids=[int4_weight_only]"], r"callbacks.qat.budget_grids=\['int4_weight_only'\]: chooses grids for a byte budget; give callbacks.qat.target_bytes"),
    ("budget_grids_on_gguf", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.target_ratio=7", "+callbacks.qat.budget_grids=[int4_weight_only]"], r"callbacks.qat.budget_grids=\['int4_weight_only'\]: are torchao's grids"),
    ("budget_probe_without_budget", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.budget_probe=true"], r"callbacks.qat.budget_probe=True: calibrates a byte budget's errors; give callbacks.qat.target_ratio"),
    ("budget_probe_not_bool", ["callbacks=qat", "callbacks.qat.scheme=int3_weight_only", "+callbacks.qat.target_ratio=7", "+callbacks.qat.budget_probe=kl"], r"callbacks.qat.budget_probe='kl': give true"),
    ("budget_grids_llama_type", ["callbacks=qat", "callbacks.qat.scheme=int3_weight_only", "+callbacks.qat.target_ratio=7", "+callbacks.qat.budget_grids=[gguf_q4_0]"], r"callbacks.qat.budget_grids\[0\].scheme='gguf_q4_0': a byte budget chooses among torchao's weight-only grids"),
    ("module_schemes_group", ["callbacks=qat", "callbacks.qat.scheme=int4_weight_only", "+callbacks.qat.module_schemes={{model.layers.0.mlp.down_proj: {{scheme: int4_weight_only, group_size: 1024}}}}"], r"callbacks.qat.module_schemes.model.layers.0.mlp.down_proj.group_size=1024: it does not divide the \d+-wide rows of model.layers.0.mlp.down_proj; give a group size that does"),
    ("module_schemes_glob", ["callbacks=qat", "callbacks.qat.scheme=int4_weight_only", "+callbacks.qat.module_schemes={{model.layers.9.mlp.up_proj: int3_weight_only}}"], r"callbacks.qat.module_schemes.model.layers.9.mlp.up_proj='int3_weight_only': the glob matches no quantized module"),
    ("calibration_batches_zero", ["callbacks=qat", "callbacks.qat.scheme=gguf_q4_0", "+callbacks.qat.calibration_batches=0"], r"callbacks.qat.calibration_batches=0: give a number of batches"),
    ("sparsity_pattern_unknown", ["callbacks=sparsity", "callbacks.sparsity.pattern=3:5"], r"callbacks.sparsity.pattern='3:5'"),
    ("wall_clock_min_ratio", ["+callbacks.wall_clock_lr._target_=callbacks.wall_clock_lr.WallClockCosine", "+callbacks.wall_clock_lr.min_ratio=2"], r"callbacks.wall_clock_lr.min_ratio=2: give a fraction in \[0, 1\]"),
    ("generation_fraction_above_one", ["distill.generation.student_fraction=1.5"], r"distill.generation.student_fraction=1.5"),
    ("cross_tokenizer_unknown", ["distill.objective.cross_tokenizer=magic"], r"distill.objective.cross_tokenizer='magic'"),
    ("heldout_set_first_not_split", ["eval.enabled=true", "~eval.heldout.test"], r"eval.heldout=\{'english': .*\}: name the run's test split first"),
    ("heldout_set_missing_files", ["eval.enabled=true", "+eval.heldout.gone={d}/nomatch*.txt"], r"eval.heldout.gone='.*nomatch\*.txt': the pattern matches no file"),
    ("heldout_set_bad_value", ["eval.enabled=true", "+eval.heldout.bad=3"], r"eval.heldout.bad=3: give 'split'"),
    ("eval_max_batches_zero", ["eval.enabled=true", "eval.max_batches=0"], r"eval.max_batches=0: give a number of batches >= 1"),
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bad (and one good) data files every case may point at."""
    folder = tmp_path_factory.mktemp("bad_data")
    for name, text in FILES.items():
        (folder / name).write_text(text)
    return folder


def test_the_table_covers_at_least_forty_bad_inputs():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# Tokenising the whole embedded corpus before the refusal (about 30 s): run with -m slow.
SLOW_CASES = {"block_size_huge"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [pytest.param(*c[1:], id=c[0], marks=(pytest.mark.slow,) if c[0] in SLOW_CASES else ()) for c in CASES],
)
def test_bad_input_gives_one_line_naming_field_value_and_fix_and_writes_nothing(
    overrides, message, tiny_cfg, tmp_path, data_dir
):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg("eval.enabled=false", *(o.format(d=data_dir) for o in overrides), output_dir=run_dir)
    with pytest.raises(ConfigError) as caught:
        train(cfg)
    text = str(caught.value)
    assert "\n" not in text  # one line
    assert re.match(message, text), text
    written = [p for p in run_dir.rglob("*") if p.is_file()] if run_dir.exists() else []
    assert written == []  # no log, checkpoint or export of a run that never started
