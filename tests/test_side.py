"""SideProcess: a function in a second process beside the caller; results, threads and failures."""

from __future__ import annotations

import operator
import os
import time

import pytest
import torch

from onnxslim.errors import OnnxSlimError
from onnxslim.recipes import load_recipe
from onnxslim.training.side import SideProcess


def settings_and_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[int, bool, torch.Tensor]:
    return torch.get_num_threads(), torch.backends.mkldnn.enabled, a + b


def test_result_comes_back_computed_with_the_given_threads_and_onednn_switch():
    with SideProcess(settings_and_sum, (torch.ones(3), torch.ones(3)), threads=2, what="sum") as side:
        threads, onednn, total = side.result()
    assert threads == 2 and onednn is torch.backends.mkldnn.enabled
    assert torch.equal(total, torch.full((3,), 2.0))


@pytest.mark.parametrize("fn,args,message", [
    (load_recipe, ("/nonexistent/recipe.toml",), "the job: recipe not found: /nonexistent/recipe.toml"),
    (operator.truediv, (1, 0), "the job: ZeroDivisionError: division by zero at"),
    (os._exit, (3,), "the job: its process ended without a result (exit code 3: a crash or a kill)"),
])
def test_failures_are_one_line_errors(fn, args, message):
    with SideProcess(fn, args, what="the job") as side, pytest.raises(OnnxSlimError) as caught:
        side.result()
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_leaving_the_block_early_ends_the_child():
    with pytest.raises(KeyboardInterrupt), SideProcess(time.sleep, (120,)) as side:
        process = side._proc
        raise KeyboardInterrupt
    assert process.poll() is not None  # terminated and reaped
    with pytest.raises(OnnxSlimError, match="threads must be >= 1"):
        SideProcess(time.sleep, (1,), threads=0)


def test_a_script_without_a_main_guard_is_not_run_again(tmp_path):
    """multiprocessing's spawn would re-run this script in the child (and hang writing to a dead child)."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text("import operator\nfrom onnxslim.training.side import SideProcess\n"
                      "with SideProcess(operator.mul, (6, 7)) as side:\n    print('result', side.result())\n")
    completed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.splitlines() == ["result 42"]
