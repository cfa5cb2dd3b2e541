"""The optimizer and the loss are config components (configs/trainer/*.yaml `optimizer:` / `loss:`), chosen by their
registered name: the options reach the optimizer, a registered loss replaces the default in the recipe, and a typo
fails before the run folder is created."""
import pytest
import torch

from factory.errors import FactoryError
from factory.registry import LOSSES, OPTIMIZERS
from factory.train.losses import LabelTokenCrossEntropy, build_loss
from factory.train.optim import build_optimizer
from train_support import make_small_world, read_metrics, train_cfg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_small_world(tmp_path_factory.mktemp("world"))


def test_the_shipped_trainer_configs_name_adamw_and_label_token_ce():
    from omegaconf import OmegaConf

    from train_support import CONFIGS

    for name in ("microworld", "paper"):
        trainer = OmegaConf.load(CONFIGS / "trainer" / f"{name}.yaml")
        assert trainer.optimizer.name == "adamw" and trainer.loss.name == "label_token_ce"
    assert "adamw" in OPTIMIZERS.names() and "label_token_ce" in LOSSES.names()


def test_optimizer_options_reach_the_optimizer():
    weight, bias = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)
    opt = build_optimizer([weight, bias, frozen], lr=0.5, weight_decay=0.1,
                          optimizer_cfg={"name": "adamw", "betas": [0.8, 0.95], "eps": 1e-6})
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-6 and opt.defaults["lr"] == 0.5
    # decay on matrices only; the frozen tensor is not optimised
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(1, 0.1), (1, 0.0)]


def test_optimizer_typos_name_the_key():
    with pytest.raises(FactoryError, match=r"Unknown optimizer 'adamww'\. Did you mean 'adamw'\?"):
        build_optimizer([], lr=1.0, weight_decay=0.0, optimizer_cfg={"name": "adamww"})
    with pytest.raises(FactoryError, match=r"`trainer\.optimizer\.beta` is not an option of optimizer 'adamw'; it "
                                           r"takes betas, eps"):
        build_optimizer([], lr=1.0, weight_decay=0.0, optimizer_cfg={"name": "adamw", "beta": 0.9})
    with pytest.raises(FactoryError, match=r"Unknown loss 'label_ce'"):
        build_loss({"loss": {"name": "label_ce"}})
    with pytest.raises(FactoryError, match=r"`trainer\.loss` has options \['smoothing'\]"):
        build_loss({"loss": {"name": "label_token_ce", "smoothing": 0.1}})


def test_label_token_ce_sums_over_the_shifted_label_tokens():
    loss = LabelTokenCrossEntropy()
    logits = torch.zeros(1, 4, 8)  # uniform: every target costs log(8)
    labels = torch.tensor([[5, -100, 3, 2]])  # targets of positions 0..2 are labels[1:]: two of them count
    assert loss.count({"labels": labels}) == 2
    assert float(loss.sum(logits, labels)) == pytest.approx(2 * torch.log(torch.tensor(8.0)).item())


class _DoubledCE(LabelTokenCrossEntropy):
    def sum(self, logits, labels):
        return 2.0 * super().sum(logits, labels)


def test_the_recipe_trains_with_the_configured_loss(world, tmp_path):
    """The same run with a registered loss that doubles the cross-entropy logs exactly twice the first loss."""
    from factory.train import run

    if "doubled_ce_for_tests" not in LOSSES:
        LOSSES.register("doubled_ce_for_tests")(_DoubledCE)
    first = {}
    for name in ("label_token_ce", "doubled_ce_for_tests"):
        cfg = train_cfg(tmp_path / name, world, stage="pretrain",
                        **{"trainer.max_steps": 1, "trainer.loss": {"name": name}})
        run(cfg)
        first[name] = read_metrics(tmp_path / name)[0]["loss"]
    assert first["doubled_ce_for_tests"] == pytest.approx(2 * first["label_token_ce"], rel=1e-6)


def test_a_typo_in_the_optimizer_fails_before_the_run_folder_exists(world, tmp_path):
    from factory.train import run

    cfg = train_cfg(tmp_path / "run", world, **{"trainer.optimizer": {"name": "adam_w"}})
    with pytest.raises(FactoryError, match=r"Unknown optimizer 'adam_w'"):
        run(cfg)
    assert not (tmp_path / "run").exists()
