"""Training from scratch learns, resumes, and the CLI reports bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.service.cli import main
from lineinspect.service.commands.train import FLAGGED_GOODS_WARNING, warn_if_threshold_rejects_goods
from lineinspect.training.datasets import open_dataset
from lineinspect.training.evaluate import evaluate
from lineinspect.training.named_pasting import RenderPool
from lineinspect.training.synth import write_synthetic_dataset
from lineinspect.training.train_defect import (
    TrainConfig,
    Trainer,
    choose_source,
    default_source,
    dihedral,
    dihedral_codes,
    focal_dice_loss,
    map_peak_loss,
)
from lineinspect.vision.model_io import load_inspector


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("line") / "metal"
    write_synthetic_dataset(root, n=48, seed=1, surface="metal", size=96)
    return root


@pytest.fixture(scope="module")
def trained(line, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    # Generic pasting only: every named type in the test split is a defect kind training never saw.
    config = TrainConfig(preset="tiny", img_size=96, steps=160, batch_size=12, seed=0, memory_bank_size=256,
                         paste_types=())
    Trainer(config, open_dataset(line), out).run()
    return out


def test_training_learns_to_find_unseen_defects(trained, line) -> None:
    """A tiny model trained briefly on generic pasted defects ranks named (unseen) defects above good images.

    A few CPU minutes is far from converged (see bench/RESULTS.md); this checks that training learns.
    """
    summary = evaluate(load_inspector(trained), open_dataset(line), latency_samples=4)
    assert summary["image_auroc"] > 0.6, summary
    config = json.loads((trained / "config.json").read_text())["training"]
    assert config["final_losses"]["defect"] < 0.8 * config["first_losses"]["defect"], config


def test_resume_continues_from_checkpoint(line, tmp_path) -> None:
    out = tmp_path / "m"
    config = TrainConfig(preset="tiny", img_size=64, steps=20, batch_size=4, memory_bank_size=64,
                         checkpoint_every_s=0.0)
    trainer = Trainer(config, open_dataset(line), out)
    trainer.load_data()
    trainer.progress.phase = "defect"
    trainer.train_phase("defect")
    trainer.checkpoint()
    resumed = Trainer(config, open_dataset(line), out, resume=True)
    assert resumed.progress.phase == "defect" and resumed.progress.step == trainer.progress.step
    resumed.run()
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_cli_eval_and_predict_json(trained, line, tmp_path, capsys) -> None:
    assert main(["eval", "--model", str(trained), "--data", str(line), "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    for key in ("image_auroc", "pixel_auroc", "f1", "threshold", "n_images", "latency_ms_p50"):
        assert key in metrics
    images = sorted((line / "test").glob("*/*.png"))[:3]
    assert main(["predict", "--model", str(trained), *map(str, images), "--json",
                 "--heatmap-dir", str(tmp_path / "heat")]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 3 and all(r["verdict"] in ("good", "defect") for r in rows)
    assert len(list((tmp_path / "heat").glob("*_overlay.png"))) == 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lineinspect.service.cli", *args], capture_output=True, text=True)


def test_bad_inputs_exit_2_with_one_clear_line(trained, line, tmp_path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = tmp_path / "truncated.jpg"
    good_jpeg = next((line / "test" / "good").glob("*.png")).read_bytes()
    truncated.write_bytes(good_jpeg[: len(good_jpeg) // 3])
    for path in (corrupt, truncated):
        r = run_cli("predict", "--model", str(trained), str(path), "--json")
        assert r.returncode == 2
        errors = [x for x in r.stderr.splitlines() if x.startswith("lineinspect: error:")]
        assert len(errors) == 1 and str(path) in errors[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("train", "--data", str(empty), "--out", str(tmp_path / "never"))
    assert r.returncode == 2 and str(empty) in r.stderr
    assert not (tmp_path / "never").exists()  # nothing half-written

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    r = run_cli("eval", "--model", str(incomplete), "--data", str(line))
    assert r.returncode == 2 and "config.json" in r.stderr

    bad_data = tmp_path / "badline"
    (bad_data / "train" / "good").mkdir(parents=True)
    (bad_data / "train" / "good" / "a.png").write_bytes(b"not an image")
    r = run_cli("train", "--data", str(bad_data), "--out", str(tmp_path / "never2"))
    assert r.returncode == 2 and "a.png" in r.stderr
    assert not (tmp_path / "never2").exists()

    r = run_cli("train", "--data", str(line), "--out", str(tmp_path / "never3"), "--val-fraction", "0.8")
    assert r.returncode == 2 and "validation fraction" in r.stderr and "0.8" in r.stderr
    assert not (tmp_path / "never3").exists()


def test_pasted_kinds_become_class_targets_when_asked(line, tmp_path) -> None:
    """With name_pasted_kinds, a line without class labels learns to name the pasted kinds: every
    image given a kind as its class target carries that pasted defect's mask, and no other does."""
    kinds = ("scratch", "hole")
    config = TrainConfig(preset="tiny", img_size=64, steps=2, batch_size=16, memory_bank_size=64,
                         paste_types=kinds, name_pasted_kinds=True, p_defect=0.0)
    trainer = Trainer(config, open_dataset(line), tmp_path / "m")
    trainer.load_data()
    assert trainer.class_names == list(kinds)
    images, masks, target, classes, _ = trainer.defect_batch()
    named = classes >= 0
    assert named.any() and bool((masks[named].flatten(1).amax(1) > 0).all())
    assert bool(target[named].all()) and bool((classes[~target] == -1).all())
    out = trainer.model.logits(images, class_region=masks)
    loss, parts = trainer.supervised_loss(out, masks, target, classes)
    assert "cls" in parts and loss.isfinite()
    plain = Trainer(TrainConfig(preset="tiny", img_size=64, paste_types=kinds), open_dataset(line), tmp_path / "p")
    assert plain.class_names == []  # off by default: names learnt in a few minutes are not yet reliable


def test_colour_reaches_the_decoder_only_where_named_kinds_are_pasted(line, tmp_path) -> None:
    def chroma(**kw) -> str:
        trainer = Trainer(TrainConfig(preset="tiny", img_size=64, **kw), open_dataset(line), tmp_path / "m")
        return trainer.model.config.head.chroma

    assert chroma() == "pixel"
    assert chroma(paste_types=()) == "image"  # generic pastes alone taught the decoder colour = defect
    assert chroma(paste_types=(), chroma="off") == "off"


def test_namer_seconds_come_out_of_the_time_budget(line, tmp_path) -> None:
    def budgets(**kw) -> tuple[float, float]:
        trainer = Trainer(TrainConfig(preset="tiny", img_size=64, time_budget=1000, name_pasted_kinds=True, **kw),
                          open_dataset(line), tmp_path / "m")
        trainer.load_data()
        training = trainer.phase_budget("defect") + trainer.phase_budget("ssl") + trainer.load_seconds
        return trainer.namer_budget(), training

    namer, train = budgets()
    assert namer == 250  # a quarter by default
    longer, shorter_train = budgets(namer_seconds=400)
    assert longer == 400 and shorter_train == pytest.approx(train - 150)
    with pytest.raises(LineInspectError, match="part of the time budget"):
        budgets(namer_seconds=1000)
    with pytest.raises(LineInspectError, match="above 0"):
        budgets(namer_seconds=0)
    with pytest.raises(LineInspectError, match="name-pasted-kinds"):
        Trainer(TrainConfig(preset="tiny", img_size=64, time_budget=1000, namer_seconds=100), open_dataset(line),
                tmp_path / "n")


def test_map_peak_loss_weighs_a_good_parts_one_false_spot() -> None:
    """The per-pixel loss barely notices one confident spot on a good part; the peak loss does."""
    logits = torch.full((2, 1, 32, 32), -6.0)
    logits[1, 0, 10:13, 10:13] = 6.0  # image 1: one 3x3 spot
    good, defect = torch.zeros(2), torch.ones(2)
    spot_on_good = map_peak_loss(logits, good, smoothing=3)
    assert spot_on_good > 20 * map_peak_loss(logits[:1].expand(2, -1, -1, -1), good, smoothing=3)
    pixel_share = focal_dice_loss(logits, torch.zeros_like(logits), torch.ones(2))
    assert spot_on_good > 20 * pixel_share  # ~9 of 1,024 pixels wrong: the mean hides them
    # defect images are left to the per-pixel loss (pushing their peak up made maps bloom)
    assert map_peak_loss(logits[1:].expand(2, -1, -1, -1), defect, smoothing=3) == 0
    with pytest.raises(LineInspectError, match="peak loss"):
        TrainConfig(peak_loss=-1).resolved()


def test_a_line_validated_on_synthetic_defects_serves_the_fused_score_by_default() -> None:
    with_bank = {"image": 0.97, "map": 0.98, "head": 0.99, "memory": 0.62, "novelty": 0.9, "fused": 0.985}
    assert default_source(with_bank, real_defects=False) == "fused"
    assert default_source(with_bank, real_defects=True) == "head"  # real defects validate the head itself
    no_bank = {k: v for k, v in with_bank.items() if k != "memory"}
    assert default_source(no_bank, real_defects=False) == "head"  # fused without the bank is not the fused score
    # a lead inside two standard errors of the default keeps the default; a clear one wins
    assert choose_source(with_bank, "fused", 20, 20)[0] == "fused"
    source, margin = choose_source({"head": 0.99, "fused": 0.80}, "fused", 20, 20)
    assert source == "head" and 0.99 - 0.80 > margin > 0.05


def test_val_fraction_sets_how_many_good_images_choose_the_threshold(line, tmp_path) -> None:
    held_out = []
    for fraction in (0.1, 0.25):
        trainer = Trainer(TrainConfig(preset="tiny", img_size=64, val_fraction=fraction), open_dataset(line),
                          tmp_path / str(fraction))
        trainer.load_data()
        held_out.append(len(trainer.val_cache))
    assert held_out == [5, 12]  # of the line's 48 good training images


def test_a_training_paints_its_named_defects_in_worker_processes(line, tmp_path) -> None:
    config = TrainConfig(preset="tiny", img_size=64, steps=3, batch_size=8, memory_bank_size=64,
                         paste_types=("scratch", "hole"), render_workers=2)
    trainer = Trainer(config, open_dataset(line), tmp_path / "m")
    out = trainer.run()
    assert trainer.pool is None  # closed with the run
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["render_workers"] == 2 and training["steps"]["defect"] == 3
    assert TrainConfig(device="cpu").resolved().render_workers == 0  # a CPU's cores train the model
    with pytest.raises(LineInspectError, match="render workers"):
        TrainConfig(render_workers=-1).resolved()


@pytest.mark.parametrize("symmetries", [False, True])
def test_batches_drawn_ahead_for_the_render_pool_are_the_batches_drawn_in_turn(line, tmp_path, symmetries) -> None:
    """With a render pool the trainer draws the next batch while the device trains on this one: the same
    batches, in the same order, as without it (with the dihedral jitter too: drawn with the batch)."""
    config = TrainConfig(preset="tiny", img_size=64, steps=2, batch_size=8, memory_bank_size=64,
                         paste_types=("scratch", "hole"), name_pasted_kinds=True, dihedral=symmetries)
    in_turn, ahead = (Trainer(config, open_dataset(line), tmp_path / name) for name in ("a", "b"))
    in_turn.load_data()
    ahead.load_data()
    ahead.pool = RenderPool(1)
    try:
        for _ in range(3):
            for a, b in zip(in_turn.defect_batch(), ahead.defect_batch()):
                assert torch.equal(a, b)
        assert ahead.next_batch is not None and in_turn.next_batch is None
    finally:
        ahead.pool.close()


def test_dihedral_jitter_moves_each_image_with_its_mask() -> None:
    """Every one of the 8 symmetries is drawn, each image is exactly its symmetry of the input, and its mask
    follows it; non-square images only mirror."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 16, 16, generator=g)
    masks = (images[:, :1] > 0.8).float()
    codes = dihedral_codes(64, True, torch.Generator().manual_seed(1))
    assert set(codes.tolist()) == set(range(8))
    out, out_masks = dihedral(images, masks, codes)
    assert torch.equal(out_masks, (out[:, :1] > 0.8).float())
    for image, moved, code in zip(images, out, codes.tolist()):
        want = image.flip(-1) if code & 1 else image
        want = want.flip(-2) if code & 2 else want
        assert torch.equal(moved, want.transpose(-1, -2) if code & 4 else want)
    assert torch.equal(images[:, :1] > 0.8, masks > 0)  # the inputs are left alone
    assert int(dihedral_codes(256, False, g).max()) < 4
    wide, _ = dihedral(torch.rand(4, 3, 8, 12), None, torch.tensor([0, 1, 2, 3]))
    assert wide.shape == (4, 3, 8, 12)


def test_dihedral_jitter_is_off_by_default_and_trains_when_asked(line, tmp_path) -> None:
    assert TrainConfig().dihedral is False
    out = tmp_path / "m"
    assert main(["train", "--data", str(line), "--preset", "tiny", "--img-size", "64", "--steps", "3",
                 "--batch-size", "8", "--dihedral-jitter", "--out", str(out)]) == 0
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["config"]["dihedral"] is True and training["steps"]["defect"] >= 1


def test_streak_share_is_off_by_default_and_reaches_the_config(line, tmp_path) -> None:
    assert TrainConfig().streak_share == 0.0
    out = tmp_path / "m"
    assert main(["train", "--data", str(line), "--preset", "tiny", "--img-size", "64", "--steps", "3",
                 "--batch-size", "8", "--streak-share", "0.5", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["training"]["config"]["streak_share"] == 0.5
    with pytest.raises(LineInspectError, match="streak share"):
        TrainConfig(streak_share=1.5).resolved()


@pytest.mark.parametrize("source", ["head", "fused"])
def test_score_source_can_be_set_instead_of_chosen_and_the_map_follows_it(line, tmp_path, source: str) -> None:
    out = tmp_path / "m"
    assert main(["train", "--data", str(line), "--preset", "tiny", "--img-size", "64", "--steps", "3",
                 "--batch-size", "8", "--score-source", source, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["calibration"]["score_source"] == source and "source_margin" not in config["calibration"]["notes"]
    assert config["calibration"]["map_source"] == source  # the map served, and boxed at thresholds chosen on it
    assert load_inspector(out).calibration.score_source == source


def test_the_map_source_can_be_set_apart_from_the_score(line, tmp_path) -> None:
    out = tmp_path / "m"
    assert main(["train", "--data", str(line), "--preset", "tiny", "--img-size", "64", "--steps", "3",
                 "--batch-size", "8", "--score-source", "fused", "--map-source", "head", "--out", str(out)]) == 0
    calibration = load_inspector(out).calibration
    assert (calibration.score_source, calibration.map_source) == ("fused", "head")
    with pytest.raises(LineInspectError, match="map source"):
        TrainConfig(map_source="regions").resolved()
    with pytest.raises(LineInspectError, match="score source"):
        TrainConfig(score_source="memory").resolved()


def test_training_warns_when_its_threshold_flags_many_held_out_goods(line, tmp_path, capsys) -> None:
    out = tmp_path / "m"
    assert main(["train", "--data", str(line), "--preset", "tiny", "--img-size", "64", "--steps", "3",
                 "--batch-size", "8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    flagged = config["calibration"]["notes"]["val_goods_flagged"]
    assert 0.0 <= flagged <= 1.0
    assert ("flags" in capsys.readouterr().err) == (flagged > FLAGGED_GOODS_WARNING)
    for share, warned in ((0.5, True), (0.1, False)):
        config["calibration"]["notes"]["val_goods_flagged"] = share
        (out / "config.json").write_text(json.dumps(config))
        warn_if_threshold_rejects_goods(out)
        err = capsys.readouterr().err
        assert ("flags 50% of the held-out good images" in err and "--target-frr" in err) == warned
