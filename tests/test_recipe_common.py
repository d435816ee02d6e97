"""The recipes' shared command line: flags checked before any work, checkpoints that two runs cannot
corrupt and that load with weights_only=True, and progress that reads well in a log file."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

from tests.recipe_helpers import RECIPES as RECIPES_DIR
from tests.recipe_helpers import load_recipe

common = load_recipe("recipe_common")
RECIPES = ["hypergradient_accuracy", "overfit_validation", "distillation", "validation_split", "augmentation"]
RECIPES += ["dropout_lstm", "hypercleaning", "learning_rates"]


@pytest.fixture
def no_data(monkeypatch):
    """Loading any data set fails loudly: a flag error must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the flags were checked")

    data, text = load_recipe("recipe_data"), load_recipe("text_data")
    for name in ("load_digits", "load_diabetes", "load_images", "load_mnist", "load_cifar10"):
        monkeypatch.setattr(data, name, refuse)
    monkeypatch.setattr(text, "load_corpus", refuse)


@pytest.mark.parametrize("name", RECIPES)
def test_an_unusable_out_fails_before_any_work(name, tmp_path, no_data):
    recipe = load_recipe(name)
    occupied = tmp_path / "results.txt"
    occupied.write_text("not a directory")
    with pytest.raises(ValueError, match=r"--out .*results\.txt: is a file"):
        recipe.main(["--quick", "--device", "cpu", "--out", str(occupied)])


@pytest.mark.parametrize("name", ["augmentation", "dropout_lstm"])
def test_cuda_without_cuda_is_a_clear_flag_error(name, tmp_path, no_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the check is about machines without it
    with pytest.raises(ValueError, match="--device 'cuda': CUDA is not available"):
        load_recipe(name).main(["--quick", "--device", "cuda", "--out", str(tmp_path)])


def test_checkpoints_are_replaced_atomically_and_load_with_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    state = {"fingerprint": {"seed": 0}, "rng": torch.get_rng_state(), "done": {"a": [1.5, 2]}}
    common.save_checkpoint(path, state)
    assert common.load_checkpoint(path, {"seed": 0})["done"] == {"a": [1.5, 2]}  # torch.load(weights_only=True)

    def killed(obj, f):  # a kill in the middle of writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(common.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"fingerprint": {"seed": 0}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt", "run.pt.lock"]  # no temporary left behind
    monkeypatch.undo()
    assert torch.equal(common.load_checkpoint(path, {"seed": 0})["rng"], state["rng"])
    with pytest.raises(ValueError, match="different flags"):
        common.load_checkpoint(path, {"seed": 1})
    common.release_checkpoint(path)


def test_a_checkpoint_claimed_by_another_run_is_refused(tmp_path):
    path = tmp_path / "shared.pt"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(path) + '.lock'!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match="in use by another running process"):
            common.load_checkpoint(path, {})
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the lock died with its holder (the kernel drops a process's flocks when it exits): claim it now
    assert common.load_checkpoint(path, {}) is None
    common.release_checkpoint(path)


def test_progress_in_a_log_file_is_one_readable_line_per_five_percent(capsys, monkeypatch):
    now = [0.0]  # a fake clock: each step takes one second
    monkeypatch.setattr(common, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    with common.progress("tuning", total=200) as update:
        for step in range(200):
            now[0] = step + 1.0
            update(loss=1.0 / (step + 1), hyperstep=step)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20
    assert lines[0] == "tuning  10/200 (5%)  0:00:10 elapsed, ~0:03:10 left  loss=0.1  hyperstep=9"
    assert lines[-1].startswith("tuning  200/200 (100%)")
    assert all("━" not in line and "…" not in line for line in lines)


@pytest.mark.parametrize(("name", "body"), [("distillation", "run"), ("overfit_validation", "_run")])
@pytest.mark.parametrize("ending", ["returns", "raises"])
def test_recipes_destroy_their_process_group_however_the_run_ends(name, body, ending, monkeypatch, tmp_path):
    """A torchrun rank that exits with its gloo group alive can abort at shutdown, so the recipes that
    join a process group must leave it on every path out of main()."""
    recipe, calls = load_recipe(name), []
    monkeypatch.setattr(common, "teardown_distributed", lambda: calls.append("teardown"))

    def fake_run(args, device):
        calls.append("run")
        if ending == "raises":
            raise RuntimeError("the run failed")
        return {}

    monkeypatch.setattr(recipe, body, fake_run)
    argv = ["--quick", "--device", "cpu", "--out", str(tmp_path)]
    if ending == "raises":
        with pytest.raises(RuntimeError, match="the run failed"):
            recipe.main(argv)
    else:
        assert recipe.main(argv) == {}
    assert calls == ["run", "teardown"]


def test_only_recipe_common_joins_a_process_group_directly():
    """Recipes go through ``recipe_common.distributed`` (which always tears down), never the raw setup."""
    for name in RECIPES:
        source = (RECIPES_DIR / f"{name}.py").read_text(encoding="utf-8")
        assert "setup_distributed(" not in source and "init_process_group(" not in source, name
