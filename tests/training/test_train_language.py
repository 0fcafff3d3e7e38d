"""The three language stages end to end at tiny size: they run, the loss falls, the gates open,
the saved language/ part loads to identical generations, and the CLI measures it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.generate import SamplingConfig, generate
from lineinspect.moe_lm.report_model import LANGUAGE_DIR, load_language, prompt_text
from lineinspect.service.cli import main
from lineinspect.training import captions as cap
from lineinspect.training.datasets import open_dataset
from lineinspect.training.synth import write_synthetic_dataset
from lineinspect.training.train_language import (
    LanguageTrainConfig,
    LanguageTrainer,
    encode_images,
    rows_the_evidence_supports,
)
from lineinspect.vision.defect_model import DefectModel, DefectModelConfig
from lineinspect.vision.encoder import preset
from lineinspect.vision.heads import HeadConfig
from lineinspect.vision.inspector import Calibration
from lineinspect.vision.model_io import load_model_dir, save_model_dir

CONFIG = LanguageTrainConfig(steps=(80, 20, 60), batch_size=16, variants=2, vocab_size=400, encode_batch=16)


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lang") / "line"
    write_synthetic_dataset(root, n=12, seed=2, surface="metal", size=64)
    return root


@pytest.fixture(scope="module")
def trained(line: Path, tmp_path_factory) -> tuple[Path, dict]:
    """A model directory: a (random, frozen) tiny defect model at 64 px, then the three stages."""
    out = tmp_path_factory.mktemp("models") / "m"
    torch.manual_seed(0)
    defect = DefectModel(DefectModelConfig(preset("tiny", img_size=64), HeadConfig()))
    save_model_dir(out, defect.eval(), Calibration())
    trainer = LanguageTrainer(CONFIG, open_dataset(line), out)
    summary = trainer.run()
    return out, summary


def test_three_stages_run_and_learn(trained) -> None:
    out, summary = trained
    stages = summary["stages"]
    assert summary["stages_done"] == [1, 2, 3]
    s1 = stages["1"]
    assert s1["steps"] == 80 and s1["final_loss"] < 0.5 * s1["first_loss"], s1  # the language is learned
    assert s1["expert_balance"]["worst"] <= 2.0, s1["expert_balance"]
    assert stages["2"]["steps"] == 20 and 0.01 <= stages["2"]["temperature"] <= 1.0
    s3 = stages["3"]
    assert s3["probe_answer_loss_after"] < s3["probe_answer_loss_before"], s3
    assert all(v == 0.0 for v in s3["gates_before"].values())  # closed until stage 3
    assert all(v > 0.0 for v in s3["gates_after"].values())
    assert 0.5 <= s3["rows_used"] <= 1.0
    assert sorted(summary["types"]) == sorted(json.loads((out / LANGUAGE_DIR / "language.json").read_text())
                                              ["data"]["types"])
    files = sorted(p.name for p in (out / LANGUAGE_DIR).iterdir())
    assert files == ["language.json", "language.safetensors", "tokenizer.json"]  # no pickles
    assert (out / "model.safetensors").is_file()  # the defect model stays in place


def test_saved_part_generates_identically(trained, line) -> None:
    out, _ = trained
    part = load_language(out)
    again = load_language(out)
    defect, calibration, _ = load_model_dir(out)
    dataset = open_dataset(line)
    images = [s.load_image() for s in dataset.test[:3]]
    evidence = encode_images(defect, images, part.model.config.evidence, torch.device("cpu"), desc=None,
                             calibration=calibration).float()
    prompts = part.tokenizer.encode_batch([prompt_text(q) for q in ("", "Where is the defect?", "Is the part OK?")])
    sampling = SamplingConfig(max_new_tokens=24, eos_id=part.tokenizer.eos_id)
    with torch.no_grad():
        a = generate(part.model.decoder, prompts, sampling, part.model.image_tokens(evidence))
        b = generate(again.model.decoder, prompts, sampling, again.model.image_tokens(evidence))
    assert a == b and any(a)
    for name, tensor in part.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name


def test_resume_skips_finished_stages(trained, line) -> None:
    out, _ = trained
    before = (out / LANGUAGE_DIR / "language.safetensors").read_bytes()
    summary = LanguageTrainer(CONFIG, open_dataset(line), out, resume=True).run()
    assert summary["stages_done"] == [1, 2, 3]
    assert (out / LANGUAGE_DIR / "language.safetensors").read_bytes() == before


def test_eval_language_cli_reports_both_phrasings_and_the_ablation(trained, line, capsys) -> None:
    out, _ = trained
    assert main(["eval-language", "--model", str(out), "--data", str(line), "--max-images", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for split in ("train", "heldout", "gates_closed"):
        for key in ("type_accuracy", "location_accuracy", "good_no_defect", "acceptable_accuracy"):
            assert key in result[split]
    assert result["n_images"] == 8 and 0 < result["chance_type_accuracy"] <= 1
    assert set(result["targets"]) == {"type_accuracy", "location_accuracy", "good_no_defect"}


def test_language_stages_need_a_defect_model(tmp_path, line) -> None:
    with pytest.raises(LineInspectError, match="model directory not found"):
        LanguageTrainer(CONFIG, open_dataset(line), tmp_path / "none")
    assert main(["train", "--data", str(line), "--out", str(tmp_path / "none"), "--stages", "1,2,3"]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--data", str(line), "--out", str(tmp_path / "x"), "--stages", "defect,4"])


def test_stage3_trains_on_rows_the_fast_paths_decision_supports() -> None:
    agrees = np.array([True, False, True, False, True, True])  # rows 1 and 3: missed, misplaced or misnamed
    caption = np.zeros(6, dtype=bool)
    assert rows_the_evidence_supports(agrees, caption).tolist() == [0, 2, 4, 5]
    caption[1] = True  # a user's caption is always kept
    assert rows_the_evidence_supports(agrees, caption).tolist() == [0, 1, 2, 4, 5]
    # a fast path that disagrees with most labels is not followed: every row trains
    assert rows_the_evidence_supports(~agrees, np.zeros(6, bool)).tolist() == [0, 1, 2, 3, 4, 5]


def test_stage3_rows_follow_the_verdict_and_the_focus_cell(trained, line) -> None:
    out, _ = trained
    trainer = LanguageTrainer(CONFIG, open_dataset(line), out)
    cfg = trainer.evidence_cfg
    labels = [cap.GOOD_LABEL, cap.DefectLabel("hole", ("top left",), 1), cap.DefectLabel("hole", ("center",), 1),
              cap.DefectLabel("stain", (cap.SPREAD,), 1)]
    trainer.images = [cap.LabelledImage(lb, pixels=np.zeros((8, 8, 3), np.uint8)) for lb in labels]
    trainer.labels = labels
    evidence = torch.zeros(len(labels), cfg.n_tokens, cfg.dim, dtype=torch.float16)
    v = cfg.verdict_index
    evidence[1:, :, v] = 1.0  # the fast path flags the three defects
    for row, cell in ((0, 4), (1, 0), (2, 1), (3, 8)):  # row 2's focus is "top", its label "center"
        evidence[row, :, v + 3 + cell] = 1.0
    trainer._evidence = evidence
    assert trainer.stage3_rows().tolist() == [0, 1, 3]  # a spread defect has no one cell to check
