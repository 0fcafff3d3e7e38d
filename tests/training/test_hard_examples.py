import pytest
import torch

from lineinspect.errors import LineInspectError
from lineinspect.training.hard_examples import HardExampleSampler
from lineinspect.training.train_defect import TrainConfig


def test_images_the_score_gets_wrong_are_drawn_more_often() -> None:
    sampler = HardExampleSampler(10, share=0.5)
    index = torch.arange(10)
    logit = torch.full((10,), -6.0)
    logit[3] = 2.0  # a good part the model calls defective
    for _ in range(10):
        sampler.update(index, torch.zeros(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool), logit)
    draws = sampler.draw(index, 4000, torch.Generator().manual_seed(0))
    share_of_3 = float((draws == 3).float().mean())
    assert 0.40 < share_of_3 < 0.55  # about half the hard share plus its uniform tenth
    assert bool((torch.bincount(draws, minlength=10) > 0).all())  # the uniform half keeps every image in


def test_a_pasted_defect_says_nothing_about_its_image_and_uniform_draws_are_unchanged() -> None:
    sampler = HardExampleSampler(4, share=0.5)
    good = torch.zeros(4, dtype=torch.bool)
    pasted = torch.tensor([True, True, False, False])  # target after pasting
    sampler.update(torch.arange(4), pasted, good, torch.tensor([-5.0, -5.0, -5.0, 5.0]))
    assert sampler.error[:2].tolist() == [0.5, 0.5]  # untouched: shown with a defect on them
    assert sampler.error[2] < 0.4 and sampler.error[3] > 0.6  # one look moves the estimate by 0.3 of the error
    plain = HardExampleSampler(4, share=0.0)
    pool = torch.arange(4)
    assert torch.equal(plain.draw(pool, 16, torch.Generator().manual_seed(1)),
                       pool[torch.randint(4, (16,), generator=torch.Generator().manual_seed(1))])
    with pytest.raises(LineInspectError, match="hard-example share"):
        TrainConfig(hard_share=1.5).resolved()
