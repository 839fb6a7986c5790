"""The stage CLIs as real processes: one-line errors without a traceback, and --help for every flag.

The in-process matrix of bad inputs is tests/test_bad_input.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest



def test_real_process_prints_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train_dp.py", "--dataset", "nosuchset", "--output",
                             str(tmp_path / "t.dppt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_flag_is_never_abbreviated(tmp_path, capsys):
    """``--epoch 1`` is refused like any unknown flag, never taken for ``--epochs 1`` (in this process: fast)."""
    import train_dp

    with pytest.raises(SystemExit) as exit_info:
        train_dp.main(["--dataset", "nosuchset", "--epoch", "1", "--output", str(tmp_path / "t.dppt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unrecognized arguments: --epoch 1")


# A default each script's --help must show (the paper's values), and a paper flag kept as an alias.
HELP_SHOWS = {
    "train_dp.py": ("eta_train: DP-SGD epochs (default: 14)", "--train_batch_size"),
    "save_dp_db_stats.py": ("(default: 1.0)", "--clip_quantile"),
    "synthesize.py": ("number of images to release (default: 60000)", "--k K, --g_steps K"),
    "train_student.py": ("(default: 100.0)", "--temperature TEMPERATURE, --T TEMPERATURE"),
    "run_pipeline.py": ("(default: 1)", "--nproc"),
    "evaluate_release.py": ("(default: 5000)", "--seeds"),
    "export_release.py": ("imagefolder", "--format"),
}


HELP_OF_EVERY_SCRIPT = """
import contextlib, io, json, runpy, sys
helps = {}
for script in sys.argv[1:]:
    sys.argv, out = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            assert exit.code in (0, None), (script, exit.code)
    helps[script] = out.getvalue()
print(json.dumps(helps))
"""


def test_help_documents_every_flag_and_its_default():
    """One process for every script (torch is imported once)."""
    result = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_SCRIPT, *sorted(HELP_SHOWS)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for script, shown in json.loads(result.stdout.splitlines()[-1]).items():
        text = " ".join(shown.split())  # argparse wraps lines
        assert "--output" in text and "usage" in text, script
        assert all(" ".join(part.split()) in text for part in HELP_SHOWS[script]), (script, text)
