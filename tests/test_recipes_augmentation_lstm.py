"""Recipes II: learned augmentation (5.4) and LSTM regularisation tuning (5.5).

Quick modes end to end (exact results.json keys, honest qualitative checks), checkpoint resume
giving identical numbers, the LSTM's second derivatives against finite differences, the text
loaders on tiny files written here in PTB format, and clear errors for bad flags.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import optree
import pytest
import torch

from tests.recipe_helpers import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


text_data = load_recipe("text_data")
augmentation = load_recipe("augmentation")
dropout_lstm = load_recipe("dropout_lstm")

import bilevel  # noqa: E402

# ------------------------------------------------------------------------------- text data


def test_pydoc_corpus_split_sizes():
    tokens = text_data.pydoc_tokens()
    assert len(tokens) > 60_000 and tokens[-1] == text_data.EOS
    train, val, test = text_data.split_tokens(tokens)
    n = len(tokens)
    assert (len(train), len(val)) == (int(0.8 * n), int(0.1 * n))
    assert len(train) + len(val) + len(test) == n
    assert train + val + test == tokens  # contiguous, nothing dropped or reordered
    train_ids, val_ids, test_ids, vocab = text_data.load_corpus("pydoc")
    assert (len(train_ids), len(val_ids), len(test_ids)) == (len(train), len(val), len(test))
    assert int(train_ids.max()) < len(vocab) and vocab.itos[:2] == [text_data.EOS, text_data.UNK]
    counts = {t: train.count(t) for t in ("the", "object")}
    assert all(vocab.stoi[t] > 1 for t in counts)  # frequent words kept
    assert "N" in vocab.stoi  # digit runs normalised as in PTB


def _write_ptb(directory: Path) -> dict[str, list[str]]:
    lines = {
        "train": ["the cat sat on the mat", "a dog <unk> the N cats", "", "the end"],
        "valid": ["the dog sat", "zebra on the mat"],
        "test": ["a cat", "the mat sat on a dog"],
    }
    for split, text in lines.items():
        (directory / f"ptb.{split}.txt").write_text("".join(f" {line} \n" for line in text))
    return lines


def test_ptb_loader_on_tiny_files(tmp_path):
    lines = _write_ptb(tmp_path)
    train, valid, test = text_data.load_ptb(tmp_path)
    expected = [w for line in lines["train"] if line for w in [*line.split(), "<eos>"]]
    assert train == expected  # words + <eos> per non-empty line
    assert valid[-1] == "<eos>" and valid.count("<eos>") == 2
    train_ids, val_ids, test_ids, vocab = text_data.load_corpus("ptb", tmp_path)
    assert vocab.decode(train_ids.tolist()) == train
    assert vocab.decode(test_ids.tolist()) == test
    assert vocab.decode(val_ids.tolist()) == [w if w != "zebra" else "<unk>" for w in valid]
    (tmp_path / "ptb.test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        text_data.load_ptb(tmp_path)
    (tmp_path / "ptb.test.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no tokens"):
        text_data.load_ptb(tmp_path)


def test_batchify_and_bad_arguments():
    ids = torch.arange(23)
    rows = text_data.batchify(ids, 4)
    assert rows.shape == (4, 5) and rows[1, 0] == 5 and rows.flatten().tolist() == list(range(20))
    with pytest.raises(ValueError, match="batch_size"):
        text_data.batchify(ids, 0)
    with pytest.raises(ValueError, match="too few"):
        text_data.batchify(ids, 20)
    with pytest.raises(ValueError, match="1-D"):
        text_data.batchify(ids.reshape(1, -1), 2)
    with pytest.raises(ValueError, match="unknown corpus"):
        text_data.load_corpus("wikitext")
    with pytest.raises(ValueError, match="--data-dir"):
        text_data.load_corpus("ptb")
    with pytest.raises(ValueError, match="min_count"):
        text_data.Vocabulary(["a"], min_count=0)


# ------------------------------------------------------------------------- model pieces


def test_augmentation_starts_as_identity():
    lam = augmentation.init_unet(channels=3, width=4)
    x, eps = torch.rand(5, 3, 8, 8), torch.randn(5, 1, 8, 8)
    assert torch.equal(augmentation.augment(lam, x, eps), x)
    lam["out.w"] = lam["out.w"] + 0.1  # away from zero the noise reaches the output
    other = augmentation.augment(lam, x, torch.randn(5, 1, 8, 8))
    assert not torch.allclose(augmentation.augment(lam, x, eps), other)


def test_concrete_mask_rate_and_scale():
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.5, 0.8):
        mask = dropout_lstm.concrete_mask(torch.tensor(math.log(p / (1 - p))), u)
        dropped = (mask * (1 - p) < 0.5).double().mean()  # the relaxed indicator 1 − z below 1/2
        assert abs(float(dropped) - p) < 0.01  # P(z > 1/2) = p exactly for the relaxed Bernoulli
        assert abs(float(mask.mean()) - 1.0) < 0.05  # inverted-dropout scaling keeps the mean


def test_lstm_double_backward_matches_finite_differences():
    """Reverse-over-reverse through the cell loop = first-derivative finite differences (float64)."""
    args = dropout_lstm.build_parser().parse_args(["--quick", "--embed", "5", "--hidden", "6"])
    cfg = dropout_lstm.config(args)
    torch.manual_seed(0)
    params = dropout_lstm.init_params(11, cfg, "cpu")
    hparams = dropout_lstm.init_hparams(params, cfg, many="per-weight", weight_decay=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (200,), generator=gen)
    x, y = dropout_lstm.windows(ids, 3, 7, gen)
    ref = params["embed"]
    tb = dropout_lstm.to_device((x, y, dropout_lstm.draw_noise(params, 3, gen)), ref)
    vb = dropout_lstm.to_device(dropout_lstm.windows(ids, 3, 7, gen), ref)
    grads = {}
    for name, hvp in (("reverse", bilevel.ReverseHVP()), ("fd", bilevel.FiniteDifferenceHVP())):
        strategy = bilevel.ConjugateGradient(maxiter=5, damping=1.0, hvp=hvp)
        grads[name], _ = bilevel.hypergradient(
            dropout_lstm.train_loss, dropout_lstm.val_loss, params, hparams, tb, vb, strategy
        )
    flat = {k: torch.cat([t.reshape(-1) for t in optree.tree_leaves(v)]) for k, v in grads.items()}
    assert flat["reverse"].abs().max() > 1e-6  # the rates do reach the validation loss
    torch.testing.assert_close(flat["fd"], flat["reverse"], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------ the cores alone


class TinyClassifier:
    """A linear classifier on flattened 8×8 images, in the core's ``classifier(w, state, x, train)`` form."""

    def __init__(self) -> None:
        self.params, self.state = {"w": 0.1 * torch.randn(10, 64), "b": torch.zeros(10)}, {}

    def __call__(self, w, state, x, train):
        return x.flatten(1) @ w["w"].T + w["b"], state


@pytest.mark.parametrize("strategy", [bilevel.Neumann(steps=3, alpha=1e-2), bilevel.Unroll(steps=3), None])
def test_the_core_runs_alone_on_tiny_data_augmentation(strategy):
    """make_optimizer + train on 24 random images: a loss per hyper-period, a hyperstep in each, and the
    U-Net (zero output layer: the identity) moved away from the identity; no tuning leaves it there."""
    gen = torch.Generator().manual_seed(0)
    data = {"x": torch.rand(24, 1, 8, 8, generator=gen), "y": torch.randint(0, 10, (24,), generator=gen)}
    data |= {"val_x": torch.rand(12, 1, 8, 8, generator=gen), "val_y": torch.randint(0, 10, (12,), generator=gen)}
    cfg = {"batch": 6, "steps": 9, "inner_steps": 3, "lr": 1e-2, "hlr": 1e-2}
    lam = augmentation.init_unet(channels=1, width=2)
    tune = strategy is not None
    opt = augmentation.make_optimizer(TinyClassifier(), lam, strategy or bilevel.Identity(), cfg, seed=0)
    losses = list(augmentation.train(opt, data, cfg, gen, "cpu", tune=tune))
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert (opt.steps, opt.hypersteps) == (9, 3 if tune else 0)
    moved = float(opt.hparams["out.w"].abs().max())
    assert moved > 0 if tune else moved == 0
    assert (opt.params["w"] - TinyClassifier().params["w"]).abs().max() > 1e-3  # the classifier trained


@pytest.mark.parametrize("phase", ["no_ho", "tuned", "overfit"])
def test_the_core_runs_alone_on_tiny_data_dropout_lstm(phase):
    """make_optimizer + train on a random stream of 11 word ids, with the recipe's data helpers: one hyperstep
    record per hyper-period with a finite validation loss, and the hyperparameters moved (not without tuning)."""
    cfg = {"embed": 5, "hidden": 6, "layers": 2, "init_rate": 0.5, "ar": 2.0, "tar": 1.0, "wd": 1e-6}
    cfg |= {"inner_steps": 2, "overfit_inner_steps": 2, "neumann": 3, "lr": 3e-3, "hlr": 0.05}
    cfg |= {"overfit_lr": 1.0, "overfit_hlr": 0.01, "overfit_damping": 80.0}
    args = argparse.Namespace(hvp="reverse", seed=0, check=False)
    params = dropout_lstm.init_params(11, cfg, "cpu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (300,), generator=gen)
    if phase == "overfit":
        hparams = {"decay": {k: torch.zeros_like(v) for k, v in params.items()}}
        fixed = dropout_lstm.windows(ids, 3, 7, gen), dropout_lstm.windows(ids, 3, 7, gen)
        batches = lambda due: fixed  # noqa: E731
    else:
        hparams = dropout_lstm.init_hparams(params, cfg, many=None, weight_decay=False)

        def batches(due):
            x, y = dropout_lstm.windows(ids, 3, 7, gen)
            return (x, y, dropout_lstm.draw_noise(params, 3, gen)), dropout_lstm.windows(
                ids, 3, 7, gen
            ) if due else None

    opt = dropout_lstm.make_optimizer(phase, params, hparams, cfg, args)
    before = [t.clone() for t in optree.tree_leaves(opt.hparams)]
    periods = list(dropout_lstm.train(opt, batches, steps=6, tune=phase != "no_ho"))
    assert len(periods) == 3 and all(math.isfinite(loss) for loss, _ in periods)
    if phase == "no_ho":
        assert all(hyper is None for _, hyper in periods) and opt.hypersteps == 0
    else:
        assert all(math.isfinite(float(hyper.val_loss)) for _, hyper in periods) and opt.hypersteps == 3
    moved = max(float((a - b).abs().max()) for a, b in zip(optree.tree_leaves(opt.hparams), before))
    assert moved > 0 if phase != "no_ho" else moved == 0


# ------------------------------------------------------------------ quick runs and resume

AUG_FLAGS = ["--quick", "--device", "cpu", "--restarts", "1", "--steps", "40"]
LSTM_FLAGS = ["--quick", "--device", "cpu", "--steps", "40"]


@pytest.fixture(scope="module")
def single_thread():
    """The quick models are tiny: one intra-op thread is faster and does not oversubscribe shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def full_stopped_resumed(main, flags: list[str], base: Path, stop_after: int) -> tuple[dict, dict, dict]:
    """A run with --checkpoint (in base/full), one stopped after ``stop_after`` hyper-periods (a simulated
    kill) and the same command rerun, resuming it (both in base/res)."""
    full = main([*flags, "--out", str(base / "full"), "--checkpoint", str(base / "a.pt")])
    resume = [*flags, "--out", str(base / "res"), "--checkpoint", str(base / "b.pt")]
    stopped = main([*resume, "--stop-after", str(stop_after)])
    return full, stopped, main(resume)


@pytest.fixture(scope="module")
def aug_runs(tmp_path_factory, single_thread):
    torch.set_default_dtype(torch.float32)
    base = tmp_path_factory.mktemp("aug")
    full, stopped, resumed = full_stopped_resumed(augmentation.main, AUG_FLAGS, base, stop_after=11)
    ckpt = torch.load(base / "a.pt", weights_only=False)
    return base, full, stopped, resumed, ckpt


def test_augmentation_quick(aug_runs):
    base, _, _, _, ckpt = aug_runs
    on_disk = json.loads((base / "full" / "results.json").read_text())
    assert set(on_disk) == {"val_acc", "test_acc", "peak_mem_bytes", "n_hparams"}
    for key in ("val_acc", "test_acc"):
        assert set(on_disk[key]) == {"no_ho", "identity", "neumann3", "unroll3"}
        for accs in on_disk[key].values():
            assert len(accs) == 1 and all(0.2 < a <= 1.0 for a in accs)  # well above chance (0.1)
    assert set(on_disk["peak_mem_bytes"]) == {"neumann3", "unroll3"}
    assert all(isinstance(v, int) and v > 0 for v in on_disk["peak_mem_bytes"].values())
    lam0 = augmentation.init_unet(1, 4)
    assert on_disk["n_hparams"] == sum(v.numel() for v in lam0.values())
    # tuned runs moved the augmentation away from the identity; no_ho did not touch it
    for method in ("identity", "neumann3", "unroll3"):
        assert ckpt["done"][f"{method}/0"]["hparams"]["out.w"].abs().max() > 0
    assert torch.equal(ckpt["done"]["no_ho/0"]["hparams"]["out.w"], lam0["out.w"])
    assert (base / "full" / "samples.png").stat().st_size > 0 and (base / "full" / "accuracy.png").exists()


def test_augmentation_resume_is_exact(aug_runs):
    _, full, stopped, resumed, _ = aug_runs
    assert stopped == {"stopped_after": 11}  # killed in the second of four runs, 1 period after its last save
    for key in ("val_acc", "test_acc", "n_hparams"):
        assert resumed[key] == full[key]


@pytest.fixture(scope="module")
def lstm_runs(tmp_path_factory, single_thread):
    torch.set_default_dtype(torch.float32)
    base = tmp_path_factory.mktemp("lstm")
    return base, *full_stopped_resumed(dropout_lstm.main, LSTM_FLAGS, base, stop_after=6)


def test_dropout_lstm_quick(lstm_runs):
    base, _, _, _ = lstm_runs
    on_disk = json.loads((base / "full" / "results.json").read_text())
    assert set(on_disk) == {"val_ppl", "test_ppl", "rates", "overfit_val_loss"}
    for key in ("val_ppl", "test_ppl"):
        assert set(on_disk[key]) == {"no_ho", "tuned", "tuned_many"}
        _, _, _, vocab = text_data.load_corpus("pydoc")
        assert all(1.0 < v < 0.6 * len(vocab) for v in on_disk[key].values())  # better than uniform guessing
    assert set(on_disk["rates"]) == {"tuned", "tuned_many"}
    for traj in on_disk["rates"].values():
        start, end = traj["trajectory"][0], traj["final"]
        assert set(end) == {"embed", "input", "hidden", "output", "dropconnect", "ar", "tar"}
        assert any(abs(end[k] - 0.5) > 1e-3 for k in ("embed", "input", "hidden", "output", "dropconnect"))
        assert len(traj["trajectory"]) == 4 and start != end
    loss = on_disk["overfit_val_loss"]
    assert len(loss) == 50 and min(loss) < loss[0] - 1.0  # the validation loss is driven down
    assert (base / "full" / "rates.png").exists() and (base / "full" / "overfit.png").exists()


def test_dropout_lstm_resume_is_exact(lstm_runs):
    base, full, stopped, resumed = lstm_runs
    assert stopped == {"stopped_after": 6}
    assert resumed == full
    assert (base / "res" / "results.json").read_text() == (base / "full" / "results.json").read_text()


# ---------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize(
    ("module", "argv", "match"),
    [
        ("augmentation", ["--quick", "--steps", "0"], "--steps"),
        ("augmentation", ["--quick", "--inner-steps", "2"], "Unroll"),
        ("augmentation", ["--quick", "--dataset", "cifar10"], "--data-dir"),
        ("augmentation", ["--quick", "--stop-after", "2"], "--checkpoint"),
        ("augmentation", ["--quick", "--n-train", "5000"], "--n-train"),
        ("dropout_lstm", ["--quick", "--layers", "1"], "--layers"),
        ("dropout_lstm", ["--quick", "--corpus", "ptb"], "--data-dir"),
        ("dropout_lstm", ["--quick", "--steps", "3", "--inner-steps", "5"], "--steps"),
        ("dropout_lstm", ["--quick", "--overfit-damping", "-1"], "--overfit-damping"),
        ("dropout_lstm", ["--quick", "--overfit-hlr", "0"], "--overfit-hlr"),
        ("dropout_lstm", ["--quick", "--overfit-hlr", "inf"], "--overfit-hlr inf"),
        ("dropout_lstm", ["--quick", "--overfit-damping", "inf"], "--overfit-damping inf"),
    ],
)
def test_bad_flags_raise_clear_errors(module, argv, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(module).main(argv)


def test_unknown_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        dropout_lstm.main(["--rates", "per-galaxy"])
    assert "--rates" in capsys.readouterr().err


def test_checkpoint_from_other_flags_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"fingerprint": {"quick": False}}, path)
    with pytest.raises(ValueError, match="different flags"):
        dropout_lstm.main(["--quick", "--checkpoint", str(path), "--out", str(tmp_path)])


def test_resnet18_layout_and_a_hypergradient_through_its_batchnorm():
    """--classifier resnet18: the paper's layout (17 3×3 convs, 3 projection shortcuts, 20 BatchNorms, fc),
    an nn.Module driven through FunctionalModule; hyperstepping leaves its running statistics alone."""
    full = augmentation.ResNet18(3)
    convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 17 and sum(m.kernel_size == (1, 1) for m in convs) == 3
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in full.modules()) == 20
    assert full.fc.weight.shape == (10, 512)
    assert 11_000_000 < sum(p.numel() for p in full.parameters()) < 11_300_000  # ResNet-18's ~11.2M weights
    torch.manual_seed(0)
    net = augmentation.Classifier("resnet18", 3, 4, "cpu", base=4)  # narrow copy of the same layout, for speed
    lam = augmentation.init_unet(3, 2)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert net(net.params, net.state, x, train=False)[0].shape == (4, 10)
    train_loss, val_loss = augmentation.losses(net)
    before = {k: v.clone() for k, v in net.state.items()}
    grads, info = bilevel.hypergradient(
        train_loss,
        val_loss,
        net.params,
        lam,
        (x, y, torch.randn(4, 1, 32, 32)),
        (x, y),
        strategy=bilevel.Neumann(steps=3, alpha=1e-2),
        state=net.state,
    )
    assert info.hvps == 2 and torch.isfinite(info.grad_norm) and float(info.grad_norm) > 0
    assert grads.keys() == lam.keys()
    assert all(torch.equal(net.state[k], v) for k, v in before.items())
