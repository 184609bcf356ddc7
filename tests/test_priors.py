"""Generative priors (GIAS/GIML): checkpoints, their refusal of damaged files, ``fedsim
train-prior``, and the attacker's auxiliary data being disjoint from the clients' data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from adversary.priors.checkpoint import PriorError, load_prior, save_prior
from adversary.priors.dcgan import Generator
from adversary.priors.search import generate
from adversary.priors.training import PriorTraining, train_prior
from fedsim.data import DataError, load_auxiliary, load_data, load_image_folder, scenario_partitions
from fedsim.run.cli import main
from fedsim.run.preparation import validate_scenario
from fedsim.run.prior import auxiliary_images
from fedsim.scenario import DataSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 8, 8)
CONFIG = {"latent_dim": 8, "width": 4}


class UserGenerator(nn.Module):
    """A user's generator with the DCGAN's interface: a linear map and a sigmoid."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 8, width: int = 4):
        super().__init__()
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        self.linear = nn.Linear(latent_dim, width * image_shape[0] * image_shape[1] * image_shape[2] // width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(z)).view(len(z), *self.image_shape)


def _trained(steps: int = 3) -> Generator:
    images = torch.rand(16, *SHAPE)
    return train_prior(images, PriorTraining(steps=steps, batch_size=8, **CONFIG), seed=1).generator


def _samples(generator: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return generator(torch.randn(6, generator.latent_dim, generator=torch.Generator().manual_seed(3)))


def test_checkpoint_round_trip_gives_identical_samples(tmp_path):
    generator = _trained()
    header = save_prior(tmp_path / "p.pt", generator, CONFIG, {"split": "auxiliary"})
    loaded, read = load_prior(tmp_path / "p.pt", SHAPE)
    assert read == header and read.data == {"split": "auxiliary"} and read.architecture == "dcgan"
    assert torch.equal(_samples(generator), _samples(loaded))
    # the BN running statistics of training travel too (eval-mode samples depend on them)
    assert not torch.equal(loaded.state_dict()["net.1.running_mean"], torch.zeros(4 * 2))
    # plain tensors and strings only: weights_only loading is what load_prior uses
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    assert set(blob) == {"header", "state"} and isinstance(blob["header"], str)


def test_a_user_generator_loads_only_when_named(tmp_path):
    user = UserGenerator(SHAPE)
    save_prior(tmp_path / "u.pt", user, CONFIG, {})
    architecture = f"{UserGenerator.__module__}:UserGenerator"
    loaded, header = load_prior(tmp_path / "u.pt", SHAPE, user_class=architecture)
    assert header.architecture == architecture and isinstance(loaded, UserGenerator)
    assert torch.equal(_samples(user), _samples(loaded))
    with pytest.raises(PriorError, match="not built in"):
        load_prior(tmp_path / "u.pt", SHAPE)


def test_damaged_checkpoints_are_refused_in_one_line(tmp_path):
    path = tmp_path / "p.pt"
    save_prior(path, _trained(1), CONFIG, {})
    blob = torch.load(path, weights_only=True)
    blob["state"]["net.0.weight"][0, 0, 0, 0] += 1e-3
    torch.save(blob, tmp_path / "tampered.pt")
    (tmp_path / "truncated.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases = {"tampered.pt": "tampered", "truncated.pt": "truncated", "text.pt": "not a checkpoint",
             "missing.pt": "no such file"}
    for name, words in cases.items():
        with pytest.raises(PriorError, match=words) as caught:
            load_prior(tmp_path / name, SHAPE)
        assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(PriorError, match=r"shape \[3, 8, 8\].*\[3, 32, 32\]"):
        load_prior(path, (3, 32, 32))


def _scenario(tmp_path: Path, generator: Path) -> Path:
    text = (ROOT / "scenarios" / "geiping_fedsgd_b1.toml").read_text()
    text = text.replace('attacks = ["geiping"]', 'attacks = ["gias"]')
    path = tmp_path / "s.toml"
    path.write_text(f'{text}\n[attack.gias]\ngenerator = "{generator}"\n')
    return path


def test_the_cli_refuses_a_tampered_or_wrong_shape_prior_with_exit_2(tmp_path, capsys):
    save_prior(tmp_path / "small.pt", _trained(1), CONFIG, {})  # 8x8 images, the scenario's are 32x32
    blob = torch.load(tmp_path / "small.pt", weights_only=True)
    blob["state"]["net.3.weight"].mul_(2)
    torch.save(blob, tmp_path / "tampered.pt")
    for command, prior, words in (("validate", "tampered.pt", "tampered"), ("attack", "small.pt", "shape")):
        args = [command, str(_scenario(tmp_path, tmp_path / prior))]
        out = tmp_path / f"run_{command}"
        code = main(args + (["--out", str(out)] if command == "attack" else []))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "attack.gias.generator" in err and words in err, err
        assert not out.exists()


def test_train_prior_writes_a_loadable_checkpoint_and_a_sample_grid(tmp_path, capsys):
    out = tmp_path / "prior.pt"
    code = main(["--quiet", "train-prior", str(ROOT / "scenarios" / "geiping_fedsgd_b1.toml"), "--out", str(out),
                 "--steps", "2", "--examples", "16", "--width", "4", "--latent-dim", "8"])
    assert code == 0, capsys.readouterr().err
    assert "last 2 steps: d_loss" in capsys.readouterr().out  # the mean spans the steps there were
    generator, header = load_prior(out, (3, 32, 32))
    assert header.data["split"] == "auxiliary" and header.data["examples"] == 16 and header.config == CONFIG
    assert out.with_suffix(".png").stat().st_size > 0 and _samples(generator).shape == (6, 3, 32, 32)
    assert main(["train-prior", str(ROOT / "scenarios" / "geiping_fedsgd_b1.toml"), "--out", str(tmp_path)]) == 2


def test_a_conditional_prior_makes_the_class_asked_for_and_round_trips(tmp_path):
    """Two classes of flat images, dark and bright: the conditional prior's samples follow the
    label they are asked for; the checkpoint keeps it conditional; a scenario with another number
    of classes is refused in one line."""
    labels = torch.arange(32) % 2
    images = (0.15 + 0.7 * labels.float()).view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()
    settings = PriorTraining(steps=150, batch_size=16, lr=1e-3, conditional=True, **CONFIG)
    generator = train_prior(images, settings, seed=1, labels=labels, num_classes=2).generator
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dark, bright = (generate(generator, z, torch.full((64,), c)).mean().item() for c in (0, 1))
    assert dark < 0.35 and bright > 0.65, (dark, bright)
    save_prior(tmp_path / "c.pt", generator, {**CONFIG, "num_classes": 2}, {"split": "auxiliary"})
    loaded, _ = load_prior(tmp_path / "c.pt", SHAPE, num_classes=2)
    mixed = torch.arange(64) % 2
    with torch.no_grad():
        assert torch.equal(generate(generator, z, mixed), generate(loaded, z, mixed))
    with pytest.raises(PriorError, match="conditional on 2 classes, the scenario's data has 10") as caught:
        load_prior(tmp_path / "c.pt", SHAPE, num_classes=10)
    assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(ValueError, match="needs the labels"):
        loaded(z)
    with pytest.raises(ValueError, match="one label per image"):
        train_prior(images, settings, seed=1, num_classes=2)


def test_train_prior_conditional_from_the_cli(tmp_path, capsys):
    scenario = str(ROOT / "scenarios" / "geiping_fedsgd_b1.toml")
    out = tmp_path / "prior.pt"
    code = main(["--quiet", "train-prior", scenario, "--out", str(out), "--conditional", "--steps", "2",
                 "--examples", "16", "--width", "4", "--latent-dim", "8"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "conditional on 10 classes" in printed.out
    generator, header = load_prior(out, (3, 32, 32), num_classes=10)
    assert header.config == {**CONFIG, "num_classes": 10} and generator.num_classes == 10
    (tmp_path / "mine").mkdir()
    code = main(["train-prior", scenario, "--out", str(tmp_path / "f.pt"), "--conditional", "--aux-folder",
                 str(tmp_path / "mine")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--conditional" in err and "no labels" in err
    five = Generator((3, 32, 32), latent_dim=8, width=4, num_classes=5)
    save_prior(tmp_path / "five.pt", five, {**CONFIG, "num_classes": 5}, {})
    run_dir = tmp_path / "run"
    assert main(["attack", str(_scenario(tmp_path, tmp_path / "five.pt")), "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "attack.gias.generator" in err and "conditional on 5 classes" in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_auxiliary_data_is_disjoint_from_every_clients_data():
    spec = DataSpec(image_size=16, train_examples=600, test_examples=100)
    splits = load_data(spec, seed=0)
    aux, labels = load_auxiliary(spec, seed=0, count=300)
    assert aux.shape == (300, 3, 16, 16) and 0.0 <= aux.min() and aux.max() <= 1.0
    assert torch.bincount(labels, minlength=10).min() >= 29  # class-balanced like the pool
    pool = splits.domain.to_unit(torch.cat([splits.train_x, splits.test_x])).flatten(1)
    nearest = torch.cdist(aux.flatten(1), pool).min(dim=1).values
    # no auxiliary image is any client's or test image (drawn from the training stream they would be
    # identical, distance ~1e-6; the closest distinct crops here are ~0.2 apart, of dark galaxy sky)
    assert nearest.min() > 0.05
    assert torch.equal(load_auxiliary(spec, seed=0, count=300)[0], aux)  # seeded


LFW_SCENARIO = """
name = "aux"
seed = 4
[data]
dataset = "lfw_faces"
image_size = 16
examples_per_client = 10
[federation]
num_clients = 4
clients_per_round = 2
rounds = 1
"""


def test_other_data_sets_train_their_prior_on_the_training_images_no_client_holds(tmp_path):
    path = tmp_path / "aux.toml"
    path.write_text(LFW_SCENARIO)
    scenario = validate_scenario(path)
    splits = load_data(scenario.data, scenario.seed)
    aux = auxiliary_images(scenario, 30)
    images = aux.images
    assert images.shape == (30, *splits.domain.shape) and aux.source["split"] == "training images held by no client"
    clients = splits.domain.to_unit(splits.train_x[torch.cat(scenario_partitions(scenario, splits))]).flatten(1)
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(images.flatten(1), clients, compute_mode=exact).min() > 1e-3  # none of the 40 client images
    pool = splits.domain.to_unit(splits.train_x).flatten(1)
    nearest = torch.cdist(images.flatten(1), pool, compute_mode=exact).min(dim=1)
    assert nearest.values.max() < 1e-5  # all from it
    assert torch.equal(aux.labels, splits.train_y[nearest.indices])  # with their own labels (a conditional prior)
    free = len(splits.train_y) - 40
    with pytest.raises(DataError, match=f"{free} of the {len(splits.train_y)} .*--examples.*data.train_examples"):
        auxiliary_images(scenario, free + 1)


def test_train_prior_takes_the_image_files_of_a_folder(tmp_path, capsys):
    folder = tmp_path / "mine" / "nested"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 20), (51, 102, 153)).save(folder / "wide.png")
    Image.new("L", (10, 10), 200).save(tmp_path / "mine" / "grey.jpg")
    (tmp_path / "mine" / "notes.txt").write_text("not an image")
    images = load_image_folder(tmp_path / "mine", (3, 8, 8), count=10, seed=0)
    assert images.shape == (2, 3, 8, 8)
    torch.testing.assert_close(images[1].mean(dim=(1, 2)), torch.tensor([0.2, 0.4, 0.6]), atol=2e-3, rtol=0)
    torch.testing.assert_close(images[0], torch.full((3, 8, 8), 200 / 255), atol=2e-2, rtol=0)  # JPEG, greyscale
    out = tmp_path / "prior.pt"
    args = ["--quiet", "train-prior", str(ROOT / "scenarios" / "geiping_fedsgd_b1.toml"), "--out", str(out),
            "--steps", "2", "--width", "4", "--latent-dim", "8", "--aux-folder", str(tmp_path / "mine")]
    assert main(args) == 0, capsys.readouterr().err
    _, header = load_prior(out, (3, 32, 32))
    assert header.data["dataset"] == "folder" and header.data["examples"] == 2
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.png" in err, err
