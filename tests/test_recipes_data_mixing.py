"""The data-mixing recipe: its text loaders on generated files, the mixture loss against finite
differences, and its quick run (results.json keys, figure)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from tests.recipe_helpers import load_recipe

mixing = load_recipe("data_mixing")
text_data = load_recipe("text_data")
PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ loaders


def _write_domains(root, texts: dict[str, list[str]]):
    for name, files in texts.items():
        folder = root / name
        folder.mkdir()
        for i, text in enumerate(files):
            (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


def test_read_domains_reads_one_folder_of_text_files_per_domain(tmp_path):
    _write_domains(tmp_path, {"b_news": ["second file", "first"], "a_code": ["x = 1\n", "print(x)  # é\n"]})
    (tmp_path / "notes.txt").write_text("not in a domain folder")
    (tmp_path / "b_news" / "skip.md").write_text("not a .txt file")
    domains = text_data.read_domains(tmp_path)
    assert list(domains) == ["a_code", "b_news"]  # folders in name order
    assert domains["a_code"] == "x = 1\n\nprint(x)  # é\n"  # files in name order, newline-joined
    assert domains["b_news"] == "second file\nfirst"
    ids = text_data.encode_bytes(domains["a_code"])
    assert ids.dtype == torch.uint8 and bytes(ids.tolist()).decode("utf-8") == domains["a_code"]


def test_read_domains_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        text_data.read_domains(tmp_path / "missing")
    _write_domains(tmp_path, {"only": ["some text"]})
    with pytest.raises(ValueError, match="at least 2"):
        text_data.read_domains(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no text"):
        text_data.read_domains(tmp_path)


def test_the_default_domains_come_from_the_standard_library():
    doc = text_data.docstrings("json")
    assert "JSON" in doc and len(doc) > 1000
    code = text_data.source_code("json")
    compile(code, "json", "exec")  # still Python
    assert "JSON (JavaScript Object Notation)" not in code  # the module docstring is gone
    assert "def dumps(" in code
    gen = torch.Generator().manual_seed(0)
    text = "abc def\nsecond line!\n\nx"
    shuffled = text_data.shuffle_within_lines(text, gen)
    for a, b in zip(text.split("\n"), shuffled.split("\n"), strict=True):
        assert Counter(a) == Counter(b)  # each line keeps its characters
    assert shuffled != text


def test_windows_draw_row_k_from_domain_k():
    streams = [torch.full((100,), k, dtype=torch.uint8) for k in range(3)]
    batch = mixing.windows(streams, 5, 8, torch.Generator().manual_seed(0))
    assert batch.shape == (3, 5, 9) and batch.dtype == torch.int64
    for k in range(3):
        assert bool((batch[k] == k).all())
    ramp = [torch.arange(50, dtype=torch.uint8)]
    rows = mixing.windows(ramp, 4, 6, torch.Generator().manual_seed(1))[0]
    assert bool((rows[:, 1:] - rows[:, :-1] == 1).all())  # contiguous windows


def test_user_domains_split_the_target_folder(tmp_path):
    _write_domains(tmp_path, {"target": ["t" * 3000], "other": ["o" * 2000]})
    args = mixing.parse_args(["--data-dir", str(tmp_path), "--target", "target", "--val-chars", "500",
                              "--test-chars", "700"])  # fmt: skip
    domains, val, test = mixing.user_domains(args)
    assert len(domains["target"]) == 1800 and len(val) == 500 and len(test) == 700
    assert domains["other"] == "o" * 2000
    args.target = "nope"
    with pytest.raises(ValueError, match="--target 'nope'"):
        mixing.user_domains(args)


# --------------------------------------------------------------------------------- the weighting


def test_the_mixture_gradient_in_the_logits_matches_finite_differences():
    torch.manual_seed(0)
    args = mixing.parse_args(["--width", "8", "--heads", "2", "--layers", "1", "--context", "6", "--dropout", "0"])
    args.seed = 0
    fm = mixing.fresh_model(args, torch.device("cpu"))
    params = {k: v.double() for k, v in fm.params.items()}
    fm.module.double()
    batch = torch.randint(0, 256, (3, 2, 7))
    logits = torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    loss = mixing.mixture_loss(fm, params, logits, batch, decay=1e-3)
    (grad,) = torch.autograd.grad(loss, logits)
    eps = 1e-6
    fd = []
    for j in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[j] = eps
        with torch.no_grad():
            up = mixing.mixture_loss(fm, params, logits + e, batch, decay=1e-3)
            down = mixing.mixture_loss(fm, params, logits - e, batch, decay=1e-3)
        fd.append(float((up - down) / (2 * eps)))
    torch.testing.assert_close(grad, torch.tensor(fd, dtype=torch.float64), rtol=1e-7, atol=1e-10)
    # and the softmax Jacobian in closed form: ∂/∂λ_j = w_j (L_j − Σ_k w_k L_k)
    with torch.no_grad():
        per_domain = torch.stack([
            mixing.mixture_loss(fm, params, torch.tensor([0.0, -1e9, -1e9], dtype=torch.float64).roll(k), batch, 0.0)
            for k in range(3)
        ])  # fmt: skip
    w = torch.softmax(logits.detach(), 0)
    torch.testing.assert_close(grad, w * (per_domain - w @ per_domain), rtol=1e-9, atol=1e-12)


def test_the_core_runs_alone_on_tiny_data():
    """learn_mixture (the page's code) on random byte streams: no recipe data, no CLI run."""
    tiny = "--width 8 --heads 2 --layers 1 --context 6 --hypersteps 2 --inner-steps 3 --batch 2 --val-batch 4"
    args = mixing.parse_args(tiny.split())
    args.seed = 0
    gen = torch.Generator().manual_seed(0)
    streams = [torch.randint(0, 256, (200,), generator=gen, dtype=torch.uint8) for _ in range(3)]
    val = torch.randint(0, 256, (100,), generator=gen, dtype=torch.uint8)
    calls = []
    for strategy in (mixing.strategy_for("ift", args), mixing.strategy_for("penalty", args)):
        fm, params, trace = mixing.learn_mixture(strategy, streams, val, args, lambda **kw: calls.append(kw))
        assert set(params) == set(fm.params)
        assert len(trace["weights"]) == args.hypersteps + 1 and trace["weights"][0] == pytest.approx([1 / 3] * 3)
        assert trace["weights"][-1] != trace["weights"][0]  # the logits moved
        assert sum(trace["weights"][-1]) == pytest.approx(1.0) and trace["skipped_hypersteps"] == 0
    assert len(calls) == 2 * args.hypersteps and all(math.isfinite(c["val_loss"]) for c in calls)


# --------------------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_mixing")
    returned = mixing.main(["--quick", "--out", str(out)])
    return out, returned


def test_quick_run_writes_the_documented_results(quick_run):
    out, returned = quick_run
    results = json.loads((out / "results.json").read_text())
    assert json.loads(json.dumps(returned)) == results
    assert results["domains"] == ["docstrings", "docs", "code", "shuffled"]
    assert results["target"] == "docstrings" and results["harmful"] == "shuffled"
    ppl = results["test_ppl"]
    for key in ("uniform", "target_only"):
        assert 1.0 < ppl[key]["mean"] < 256.0
    assert ppl["best_single"]["domain"] in results["domains"]
    assert ppl["best_single"]["mean"] == min(v["mean"] for v in ppl["single"].values())
    for name in ("ift", "penalty"):
        run = results["learned"][name]
        assert 1.0 < run["test_ppl"]["mean"] < 256.0 and 1.0 < run["retrained_ppl"]["mean"] < 256.0
        weights = [run["final_weights"][d]["mean"] for d in results["domains"]]
        assert math.isclose(sum(weights), 1.0, rel_tol=1e-6)
        assert run["hyperstep_ms"] > 0 and run["inner_step_ms"] > 0
        assert results["peak_mem_bytes"][name] > 0
    assert results["learned"]["ift"]["hvps_per_hyperstep"] > 0
    assert results["learned"]["penalty"]["hvps_per_hyperstep"] == 0
    assert results["learned"]["penalty"]["gradients_per_hyperstep"] == 3 * 5 + 3
    history = json.loads((out / "history.json").read_text())
    assert len(history[0]["ift"]["weights"]) == results["hypersteps"] + 1
    assert (out / "data_mixing_weights.png").read_bytes()[:8] == PNG


def test_a_user_data_dir_runs_end_to_end(tmp_path):
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta"]
    text = " ".join(words[i] for i in torch.randint(0, 4, (2000,), generator=gen).tolist())
    noise = "".join(chr(97 + i) for i in torch.randint(0, 26, (6000,), generator=gen).tolist())
    data = tmp_path / "data"
    data.mkdir()
    _write_domains(data, {"target": [text], "noise": [noise]})
    out = tmp_path / "out"
    results = mixing.main(["--data-dir", str(tmp_path / "data"), "--target", "target", "--val-chars", "1000",
                           "--test-chars", "1000", "--hypersteps", "2", "--inner-steps", "2", "--seeds", "1",
                           "--width", "16", "--heads", "2", "--layers", "1", "--out", str(out)])  # fmt: skip
    assert results["domains"] == ["noise", "target"] and results["target"] == "target"
    assert results["harmful"] is None
    assert results["test_ppl"]["target_only"] == results["test_ppl"]["single"]["target"]


def test_bad_flags_are_refused_with_the_flag_named(capsys):
    for argv, message in [
        (["--data-dir", "x"], "--data-dir and --target go together"),
        (["--strategies", "ift,cg"], "--strategies 'ift,cg'"),
        (["--width", "30", "--heads", "4"], "multiple of --heads"),
        (["--seeds", "0"], "--seeds 0"),
    ]:
        with pytest.raises(SystemExit):
            mixing.parse_args(argv)
        assert message in capsys.readouterr().err
