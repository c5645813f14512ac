"""What sampling accepts as input: prompt files (one reader for the CLI and training; every .jsonl line is
JSON, .txt lines are plain text), prompts longer than the model's positions (refused, or cut as
data.truncation cuts), and an --output that would overwrite the prompts."""

import json
import os
import shutil
import types

import pytest
from transformers import AutoTokenizer

from jaxdpo import sample
from jaxdpo.errors import ConfigError
from jaxdpo.sampling import generate as gen
from jaxdpo.sampling import text
from jaxdpo.sampling import prompts as prompts_lib

POSITIONS = 32  # the short model's, so that an over-long prompt is a few words
LONG = "What color is the cat? " * 8  # more tokens than POSITIONS


@pytest.fixture(scope="module")
def short_model(assets, tmp_path_factory):
    """The tiny assets' model and tokenizer, with max_position_embeddings = POSITIONS."""
    path = str(tmp_path_factory.mktemp("short") / "model")
    shutil.copytree(assets["model"], path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config | {"max_position_embeddings": POSITIONS}, f)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    status = sample.main([*args, "--temperature=0"])
    out, err = capsys.readouterr()
    return status, out, err.strip()


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def assert_one_line(err: str, *parts: str):
    assert len(err.splitlines()) == 1 and err.startswith("jaxdpo.sample: "), err
    for part in parts:
        assert part in err, err


def test_a_jsonl_line_that_does_not_parse_is_an_error_naming_file_and_line(short_model, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", ['{"prompt": "ok"}', '{"prompt": "broken'])
    status, _, err = run_cli(capsys, f"--model={short_model}", f"--prompts={prompts}", "--max_new_tokens=4",
                             f"--output={tmp_path / 'o.jsonl'}")
    assert status == 2
    assert_one_line(err, "p.jsonl line 2", "invalid_json")
    assert not (tmp_path / "o.jsonl").exists()


def test_txt_lines_are_plain_text_prompts_and_jsonl_lines_are_json(tmp_path):
    text = write_lines(tmp_path / "p.txt", ["What color is the cat?", "", '{"prompt": "kept as text"}'])
    assert prompts_lib.read_prompts(text, prompts_lib.PromptKeys(), config_key="--prompts") == [
        "What color is the cat?", '{"prompt": "kept as text"}']
    rows = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', '{"prompt": [{"role": "user", "content": "b"}]}',
                                              '{"chosen": "c d", "rejected": "c e"}'])
    assert prompts_lib.read_prompts(rows, prompts_lib.PromptKeys(), config_key="--prompts") == [
        "a", [{"role": "user", "content": "b"}], "c"]


def test_online_prompts_use_the_same_reader_and_refuse_a_broken_line(tiny_config, tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", ['{"prompt": "ok"}', "plain text"])
    with pytest.raises(ConfigError, match=r"p.jsonl line 2\): invalid_json"):
        prompts_lib.read_prompts(prompts, tiny_config(tmp_path).data, config_key="online.prompts")


@pytest.mark.parametrize("output", ["same", "symlink"])
def test_an_output_that_is_the_prompts_file_is_refused(short_model, tmp_path, capsys, output):
    prompts = write_lines(tmp_path / "p.jsonl", ['{"prompt": "What color is the cat?"}'])
    before = (tmp_path / "p.jsonl").read_text()
    (tmp_path / "sub").mkdir()
    target = str(tmp_path / "sub" / ".." / "p.jsonl")
    if output == "symlink":
        target = str(tmp_path / "link.jsonl")
        os.symlink(prompts, target)
    status, _, err = run_cli(capsys, f"--model={short_model}", f"--prompts={prompts}", "--max_new_tokens=4",
                             f"--output={target}")
    assert status == 2
    assert_one_line(err, f"--output = {target} is the prompts file {prompts}")
    assert (tmp_path / "p.jsonl").read_text() == before


def test_a_prompt_too_long_for_the_positions_is_refused_with_its_index_and_lengths(short_model, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "Hi"}), json.dumps({"prompt": LONG})])
    status, _, err = run_cli(capsys, f"--model={short_model}", f"--prompts={prompts}", "--max_new_tokens=4",
                             f"--output={tmp_path / 'o.jsonl'}")
    assert status == 2
    n = len(text.encode_prompt(AutoTokenizer.from_pretrained(short_model), LONG))
    assert n > POSITIONS
    assert_one_line(err, f"prompt 1 has {n} tokens; with max_new_tokens = 4 that is {n + 4} > the model's 32 positions",
                    "--truncate_prompt=keep_end|keep_start")
    assert "indexing errors" not in err  # transformers' own notice is not shown as well


def test_truncate_prompt_cuts_it_and_says_how_many(short_model, tmp_path, capsys):
    prompts = write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "Hi"}), json.dumps({"prompt": LONG})])
    output = tmp_path / "o.jsonl"
    status, out, err = run_cli(capsys, f"--model={short_model}", f"--prompts={prompts}", "--max_new_tokens=4",
                               f"--output={output}", "--truncate_prompt=keep_end")
    assert status == 0, err
    assert "cut 1 of 2 prompts (keep_end) to fit the model's positions with --max_new_tokens=4" in out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hi", LONG] and all(len(r["completion_ids"]) >= 1 for r in rows)


def test_prompt_room_cuts_as_data_truncation_does():
    bos, ids = 1, [1, 10, 11, 12, 13, 14, 15]
    room = prompts_lib.PromptRoom(positions=8, truncation="keep_end")
    assert room.fit([ids, [1, 2]], 4, bos) == [[1, 13, 14, 15], [1, 2]]  # BOS kept, then the prompt's end
    assert prompts_lib.PromptRoom(8, "keep_start").fit([ids], 4, bos) == [[1, 10, 11, 12]]
    assert prompts_lib.PromptRoom(8).fit([ids[:4]], 4, bos) == [ids[:4]]  # exactly fits: unchanged
    with pytest.raises(ConfigError, match="prompt 0 has 7 tokens; with max_new_tokens = 4 that is 11 > the model's 8"):
        prompts_lib.PromptRoom(8).fit([ids], 4, bos)
    with pytest.raises(ConfigError, match="max_new_tokens = 8 leaves no room for a prompt in the model's 8 positions"):
        room.fit([ids], 8, bos)


def test_samples_during_training_follow_data_truncation_and_say_it_once(short_model, capsys):
    from flax import nnx

    from jaxdpo.models import from_pretrained
    from jaxdpo.parallel.sharding import make_mesh
    from jaxdpo.sampling.samples import Sampler

    model = from_pretrained(short_model)
    graphdef, state = nnx.split(model)
    sampler = Sampler.for_model(graphdef, model.config, tokenizer=AutoTokenizer.from_pretrained(short_model),
                                mesh=make_mesh(data=1), model_dir=short_model,
                                data_cfg=types.SimpleNamespace(truncation="keep_start"), batch_size=2)
    settings = gen.SamplingSettings(max_new_tokens=6)
    rows = sampler.complete((state,), ["Hi", LONG], settings)
    assert [len(r["prompt_ids"]) for r in rows] == [2, POSITIONS - 6]
    assert "1 of 2 prompts cut (keep_start) to leave max_new_tokens = 6 of the model's 32 positions" in (
        capsys.readouterr().out)
    sampler.complete((state,), ["Hi", LONG], settings)
    assert "prompts cut" not in capsys.readouterr().out  # held-out prompts are sampled at every eval
