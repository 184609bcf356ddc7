"""Scenario schema: the TOML file that fully describes one experiment.

``load_scenario(path)`` parses a TOML file into a frozen :class:`Scenario`.
Every key has a default; unknown keys, wrong types and out-of-range values raise
:class:`fedsim.config.ScenarioError` naming the file and the key. Attack and
defense parameter tables are kept as plain tables here and validated by their
registries (``defenses.registry``, ``adversary.runtime.registry``) before a run starts,
so this module does not depend on them.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fedsim.config import ScenarioError, build_dataclass, to_table

DATASETS = ("embedded_photos", "lfw_faces", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder")
MODELS = ("convnet", "resnet18", "mlp")
LR_SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class DataSpec:
    """Which data set, how big, and how it is split across clients."""

    dataset: str = field(default="embedded_photos", metadata={"choices": DATASETS})
    root: str = field(default="data", metadata={"doc": "folder of real data sets (torchvision layout)"})
    download: bool = False
    image_size: int = field(default=32, metadata={"min": 8, "max": 512})
    train_examples: int = field(default=2000, metadata={"min": 10, "doc": "training pool size (embedded sets: generated)"})
    test_examples: int = field(default=500, metadata={"min": 10})
    partition: str = field(default="iid", metadata={"choices": ("iid", "dirichlet")})
    dirichlet_alpha: float = field(default=0.5, metadata={"gt": 0.0})
    examples_per_client: int = field(default=64, metadata={"min": 1})


@dataclass(frozen=True)
class ModelSpec:
    """Architecture; the attacker knows it (honest-but-curious server)."""

    name: str = field(default="convnet", metadata={"choices": MODELS})
    width: int = field(default=32, metadata={"min": 1, "doc": "ConvNet base channels / ResNet base width"})
    hidden: tuple[int, ...] = field(default=(256,), metadata={"min": 1, "doc": "MLP hidden widths"})
    head: tuple[int, ...] = field(default=(), metadata={"min": 1, "doc": "convnet/resnet18: hidden Linear-ReLU widths between the pooled features and the classifier"})


@dataclass(frozen=True)
class FederationSpec:
    num_clients: int = field(default=10, metadata={"min": 1})
    clients_per_round: int = field(default=5, metadata={"min": 1})
    rounds: int = field(default=3, metadata={"min": 1})
    client_cpus: float = field(default=1.0, metadata={"gt": 0.0})
    failing_clients: tuple[int, ...] = field(default=(), metadata={"min": 0, "doc": "client ids that raise (fault-injection tests)"})
    failures_expected: bool = field(default=False, metadata={"doc": "a round in which every sampled client fails does not stop the run"})

    def check(self) -> tuple[str, str] | None:
        if self.clients_per_round > self.num_clients:
            return "clients_per_round", f"got {self.clients_per_round}, must be <= num_clients ({self.num_clients})"
        return None


@dataclass(frozen=True)
class TrainingSpec:
    """The local-training regime the server dictates (public to the attacker)."""

    epochs: int = field(default=1, metadata={"min": 1})
    batch_size: int = field(default=32, metadata={"min": 1})
    max_steps: int = field(default=0, metadata={"min": 0, "doc": "cap on local steps per round (0 = no cap)"})
    lr: float = field(default=0.05, metadata={"gt": 0.0})
    momentum: float = field(default=0.0, metadata={"min": 0.0, "max": 0.999})
    weight_decay: float = field(default=0.0, metadata={"min": 0.0})
    nesterov: bool = False
    shuffle: bool = True
    lr_schedule: str = field(default="constant", metadata={"choices": LR_SCHEDULES})
    lr_gamma: float = field(default=0.1, metadata={"gt": 0.0, "max": 1.0, "doc": "step schedule factor"})
    lr_milestones: tuple[int, ...] = field(default=(), metadata={"min": 1, "doc": "rounds where the step schedule multiplies lr by lr_gamma"})

    def check(self) -> tuple[str, str] | None:
        if self.nesterov and self.momentum == 0.0:
            return "nesterov", "nesterov = true needs momentum > 0"
        return None

    def lr_at(self, server_round: int, total_rounds: int) -> float:
        """Learning rate for 1-based ``server_round``."""
        import math

        if self.lr_schedule == "step":
            return self.lr * self.lr_gamma ** sum(server_round >= m for m in self.lr_milestones)
        if self.lr_schedule == "cosine":
            progress = (server_round - 1) / max(total_rounds - 1, 1)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr


@dataclass(frozen=True)
class DefenseSpec:
    name: str = "none"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AttackPlan:
    """Which updates the curious server attacks, and with what.

    ``params`` holds one table per attack name (``[attack.geiping]`` ...),
    validated by the attack registry.
    """

    attacks: tuple[str, ...] = ()
    rounds: tuple[int, ...] = field(default=(1,), metadata={"min": 1, "doc": "rounds to attack (empty = every round)"})
    clients: tuple[int, ...] = field(default=(0,), metadata={"min": 0, "doc": "client ids to attack (empty = every sampled client)"})
    pool_size: int = field(default=1, metadata={"min": 1})
    batch_jobs: int = field(default=1, metadata={"min": 1, "doc": "compatible queued jobs (same attack, round and config) a worker takes in one vectorised launch; > 1 pays on a GPU"})
    worker_cpus: float = field(default=1.0, metadata={"gt": 0.0})
    wait: bool = field(default=False, metadata={"doc": "rounds wait for their attacks to finish"})
    timeout_s: float = field(default=1800.0, metadata={"gt": 0.0})
    grant_labels: bool = False
    knows_defense: bool = False
    recovered_psnr: float = 20.0
    max_images: int = field(default=64, metadata={"min": 1, "doc": "distinct examples per attacked update (caps the batch the attack reconstructs)"})
    params: dict = field(default_factory=dict)


NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


@dataclass(frozen=True)
class Scenario:
    name: str = field(default="scenario", metadata={
        "pattern": NAME_PATTERN, "doc": "names the default run directory runs/NAME-TIMESTAMP",
        "pattern_doc": "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"})
    description: str = ""
    seed: int = 0
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    federation: FederationSpec = field(default_factory=FederationSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    defense: DefenseSpec = field(default_factory=DefenseSpec)
    attack: AttackPlan = field(default_factory=AttackPlan)
    source: str = field(default="<memory>", compare=False, metadata={"internal": True})

    def check(self) -> tuple[str, str] | None:
        if self.data.examples_per_client * self.federation.num_clients > self.data.train_examples:
            return ("data.examples_per_client",
                    f"{self.federation.num_clients} clients x {self.data.examples_per_client} examples "
                    f"exceeds data.train_examples ({self.data.train_examples})")
        for c in self.attack.clients:
            if c >= self.federation.num_clients:
                return "attack.clients", f"client {c} does not exist (num_clients = {self.federation.num_clients})"
        for r in self.attack.rounds:
            if r > self.federation.rounds:
                return "attack.rounds", f"round {r} is past federation.rounds ({self.federation.rounds})"
        for c in self.federation.failing_clients:
            if c >= self.federation.num_clients:
                return "federation.failing_clients", f"client {c} does not exist"
        return None

    def round_training(self, server_round: int) -> TrainingSpec:
        """The public local-training config the server dictates in 1-based ``server_round``:
        ``training`` with ``lr`` set to that round's learning rate. The strategy computes it once
        per round, sends its ``lr`` to the clients and hands it to the attacker unchanged."""
        return replace(self.training, lr=self.training.lr_at(server_round, self.federation.rounds))


def _split_params(table: dict[str, Any], fixed: set[str], tables_only: bool) -> dict[str, Any]:
    """Move keys that are not schema fields into ``params`` (only sub-tables if ``tables_only``)."""
    def is_param(k: str, v: Any) -> bool:
        return k not in fixed and (isinstance(v, dict) or not tables_only)

    out = {k: v for k, v in table.items() if not is_param(k, v)}
    extra = {k: v for k, v in table.items() if is_param(k, v)}
    if extra:
        params = dict(out.get("params", {}))
        params.update(extra)
        out["params"] = params
    return out


def parse_scenario(table: dict[str, Any], source: str | Path = "<memory>") -> Scenario:
    """Validate a TOML table (already parsed) into a :class:`Scenario`."""
    table = dict(table)
    if isinstance(table.get("defense"), dict):
        table["defense"] = _split_params(table["defense"], {"name"}, tables_only=False)
    if isinstance(table.get("attack"), dict):
        attack = table["attack"]
        fixed = {f for f in AttackPlan.__dataclass_fields__ if f != "params"}
        # sub-tables named after attacks ([attack.geiping]) are attack parameters
        table["attack"] = _split_params(attack, fixed, tables_only=True)
    if "source" in table:
        raise ScenarioError(source, "source", "unknown key")
    scenario = build_dataclass(Scenario, table, source)
    return replace(scenario, source=str(source))


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; raise ScenarioError with file + key on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(path, "", "file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(path, "", f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise ScenarioError(path, "", f"cannot be read ({exc.strerror})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(path, "", f"not valid TOML: {exc}") from None
    return parse_scenario(table, path)


def scenario_to_table(scenario: Scenario) -> dict[str, Any]:
    """The resolved scenario as a TOML-ready table (for the run directory)."""
    table = to_table(scenario)
    table.pop("source", None)
    defense = table.pop("defense")
    table["defense"] = {"name": defense["name"], **defense["params"]}
    attack = table.pop("attack")
    params = attack.pop("params")
    table["attack"] = {**attack, **params}
    return table
