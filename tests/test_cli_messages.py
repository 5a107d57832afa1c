"""What the command line says when its first word is a slip for a command, and when it is a prompt (TYPO_RULE in
cli/commands.py): in-process, `main(argv)` with stdout, stderr and the exit code captured."""

import pytest

from llama3_raw.cli import commands, main, run_script_main
from helpers import OFFICIAL_TOKENIZER, TINY_GQA, call, random_state_dict, write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with a tokenizer that spells every word: what a prompt becomes is seen in stdout."""
    return write_checkpoint(tmp_path_factory.mktemp("typo"), TINY_GQA, random_state_dict(TINY_GQA, seed=5),
                            tokenizer=OFFICIAL_TOKENIZER)


@pytest.mark.parametrize("word, command", [
    ("insepct", "inspect"), ("inspct", "inspect"), ("insp", "inspect"), ("inspection", "inspect"),
    ("chta", "chat"), ("chart", "chat"), ("scroe", "score"), ("sco", "score"), ("compre", "compare"),
    ("comapre", "compare"), ("ruin", "run"),
])
def test_a_lowercase_word_near_a_command_is_taken_for_it(word, command):
    assert commands.mistyped_command(word) == command


@pytest.mark.parametrize("word", [
    "hello", "romeo", "the", "compile", "Insepct", "INSPECT", "ROMEO:", "insepct.", "insepct2", "once upon a time",
    "inspect the model", "", "co", "of", "inspect", "run", "--help", "-h", "--version", "naïve",
])
def test_every_other_first_word_reads_as_a_prompt_or_a_command(word):
    assert commands.mistyped_command(word) is None


@pytest.mark.parametrize("argv, command", [
    (["insepct"], "inspect"), (["insepct", "--out", "views"], "inspect"), (["scor", "text.txt"], "score"),
    (["chta", "--message", "hi"], "chat"),
])
def test_a_typo_is_one_line_exit_2_and_nothing_runs(argv, command, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = call(main, [*argv, "--ckpt-dir", str(checkpoint)], capsys)
    assert code == 2 and out == ""
    assert err == (f"error: {argv[0]} is not a command (did you mean {command}?); write llama3-raw {command}, or to "
                   f"complete {argv[0]} as a prompt, llama3-raw run {argv[0]} (see llama3-raw --help).\n")
    assert list(tmp_path.iterdir()) == []  # inspect's views/ was not made, no model was loaded


@pytest.mark.parametrize("argv", [
    ["hello"],  # one word that resembles no command
    ["Insepct"],  # capitals: a prompt, as "ROMEO:" is
    ["once upon a time"],  # one quoted phrase
    ["inspect the model"],  # a phrase that starts with a command's name
    ["run", "insepct"],  # the way to complete a word that looks like a typo
])
def test_prompts_still_generate(argv, checkpoint, capsys):
    code, out, err = call(main, [*argv, "--ckpt-dir", str(checkpoint), "--max-new-tokens", "2", "--temperature", "0"],
                          capsys)
    assert code == 0, err
    assert out.startswith(argv[-1]) and len(out) > len(argv[-1]) + 1  # the prompt, then new text
    assert "2 new tokens" in err


def test_run_py_has_no_commands_so_every_first_word_is_a_prompt(checkpoint, capsys):
    code, out, err = call(run_script_main, ["insepct", "--ckpt-dir", str(checkpoint), "--max-new-tokens", "1",
                                            "--temperature", "0"], capsys)
    assert code == 0 and out.startswith("insepct"), err


def test_the_rule_is_in_the_help(capsys):
    code, out, _ = call(main, ["--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "such as insepct or insp, is taken for a mistyped command" in text
    assert "To complete such a word, name the command: llama3-raw run insepct." in text
