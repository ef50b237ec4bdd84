"""Flags, environment variables and validation: one source of truth, clear one-line errors."""

import pytest

from peer.cli import build_parser, main, parse_config
from peer.config import PeerConfig, field_names
from peer.errors import UserError


def test_defaults_need_no_arguments():
    cfg, explicit = parse_config([], environ={})
    assert cfg == PeerConfig().validate()
    assert explicit == set()


def test_every_config_field_has_a_flag_and_help():
    help_text = build_parser().format_help()
    for name in field_names():
        assert "--" + name.replace("_", "-") in help_text
        assert "BERTSWARM_" + name.upper() in help_text


A = "/ip4/127.0.0.1/tcp/4000/p2p/12D3KooWB72XDuQv8xY5qFEzdJutWeuR5pJuipzJaK1Z5dD9DKVG"
B = "/ip4/127.0.0.2/tcp/4001/p2p/12D3KooWB72XDuQv8xY5qFEzdJutWeuR5pJuipzJaK1Z5dD9DKVG"


def test_flags_env_and_precedence():
    env = {
        "BERTSWARM_BATCH_SIZE": "4",
        "BERTSWARM_JOIN": f"{A} {B}",
        "BERTSWARM_CLIENT_MODE": "yes",
        "BERTSWARM_LR": "1e-3",
    }
    cfg, explicit = parse_config(["--batch-size", "8", "--preset", "mini"], environ=env)
    assert cfg.batch_size == 8  # the flag wins over the variable
    assert cfg.join == [A, B] and cfg.client_mode is True and cfg.lr == 1e-3 and cfg.preset == "mini"
    assert explicit == {"batch_size", "join", "client_mode", "lr", "preset"}


def test_repeatable_join():
    cfg, _ = parse_config(["--join", A, "--join", B], environ={})
    assert cfg.join == [A, B]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--preset", "huge"], "--preset 'huge': unknown; choose one of tiny, mini, base, large"),
        (["--device", "tpu"], "--device"),
        (["--batch-size", "0"], "--batch-size 0: must be a positive integer"),
        (["--batch-size", "abc"], "invalid int value"),
        (["--seq-len", "4"], "--seq-len 4"),
        (["--mlm-probability", "1.5"], "--mlm-probability"),
        (["--warmup-steps", "100", "--total-steps", "50"], "--warmup-steps 100"),
        (["--metrics-port", "70000"], "--metrics-port 70000"),
        (["--run-id", "has space"], "--run-id"),
        (["--client-mode", "--announce", "/ip4/1.2.3.4/tcp/1"], "--client-mode"),
        (["--batch-size", "64", "--target-batch-size", "32"], "exceeds --target-batch-size"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_are_user_errors(argv, fragment):
    with pytest.raises(UserError) as info:
        parse_config(argv, environ={})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_env_value_names_the_variable():
    with pytest.raises(UserError, match="BERTSWARM_BATCH_SIZE='many'"):
        parse_config([], environ={"BERTSWARM_BATCH_SIZE": "many"})


def test_main_prints_one_line_and_exits_2(capsys):
    assert main(["--preset", "huge"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bertswarm-peer: error: --preset 'huge'")
    assert "Traceback" not in err


def test_boolean_flags_turn_off_what_the_environment_turned_on():
    cfg, explicit = parse_config(["--no-nsp"], environ={"BERTSWARM_NSP": "1"})
    assert cfg.nsp is False and "nsp" in explicit
    cfg, _ = parse_config([], environ={"BERTSWARM_NSP": "1"})
    assert cfg.nsp is True
    cfg, _ = parse_config(["--nsp"], environ={})
    assert cfg.nsp is True


def test_library_errors_name_no_flag_and_the_command_adds_it(tmp_path):
    from peer.data.corpus import load_documents
    from peer.data.tokenizer import load_tokenizer
    from peer.errors import InputError
    from peer.trainer import load_inputs

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(InputError, match=rf"^{empty}: file is empty; pass a file with text in it$"):
        load_documents([str(empty)])
    with pytest.raises(InputError, match=r"^/nonexistent: no such file"):
        load_tokenizer("/nonexistent")
    with pytest.raises(UserError, match=rf"^--data {empty}: file is empty; pass a file with text in it$"):
        load_inputs(None, [str(empty)])
    with pytest.raises(UserError, match=r"^--tokenizer /nonexistent: no such file or directory"):
        load_inputs("/nonexistent", [str(empty)])


@pytest.mark.timeout(60)
def test_a_wrong_data_path_is_answered_before_the_heavy_imports(tmp_path):
    """A mistyped --data used to be answered after torch, transformers and hivemind were imported (6 s here); the text
    entries are looked at first, with the same one-line messages, while a good file, a prepared directory and an
    hf: entry pass through to the run."""
    import subprocess
    import sys

    (tmp_path / "blob.txt").write_bytes(b"\x00\x01binary")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "good.txt").write_text("\n\nsome text\n")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "train-00000.npy").write_bytes(b"")
    probe = (
        "import sys\n"
        "from peer import cli\n"
        "from peer.errors import UserError\n"
        "for data, expected in [('missing.txt', 'no such file or directory'), ('blob.txt', 'binary file'),\n"
        "                       ('blank.txt', 'file is empty'), ('*.jsonl', 'glob matches no files')]:\n"
        "    try:\n"
        "        cli.check_data_flag([data])\n"
        "    except UserError as e:\n"
        "        assert str(e).startswith(f'--data {data}: ') and expected in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(data)\n"
        "cli.check_data_flag(['good.txt', 'prepared', 'hf:wikitext:wikitext-2-raw-v1'])\n"
        "heavy = sorted({'torch', 'transformers', 'hivemind'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert main(["--data", str(tmp_path / "blob.txt")]) == 2
