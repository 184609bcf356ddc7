"""One attack job, start to finish: run the attack on the observation, then score its
reconstruction against the ground truth. Shared by the Ray workers and the in-process
single-shot mode (``fedsim attack``)."""
from __future__ import annotations

import functools
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from adversary.scoring.images import save_comparison_grid
from adversary.scoring.metrics import LpipsScorer, score_reconstruction
from adversary.observation import GroundTruth, Observation, Reconstruction
from adversary.attacks.base import AttackContext
from adversary.runtime.registry import get_attack
from fedsim.rundir import LEAKAGE, RECONSTRUCTIONS, RunDirectory
from fedsim.scenario import Scenario
from fedsim.seeding import derive_seed


@dataclass
class AttackJob:
    """An attack to run on one tapped update. ``truth`` is used for scoring only."""

    job_id: int
    attack: str
    params: Any  # the attack's frozen params dataclass
    observation: Observation
    truth: GroundTruth
    defense: str
    recovered_psnr: float
    timeout_s: float
    seed: int


@dataclass
class LeakageRecord:
    """One line of ``leakage.jsonl``. ``status`` is "ok", "failed" or "timeout" (the attack was
    stopped by its deadline: the scores are those of what it had reached, or it was killed and
    there are none)."""

    round: int
    client: int
    attack: str
    defense: str
    status: str
    error: str | None = None
    psnr_mean: float | None = None
    psnr_best: float | None = None
    ssim_mean: float | None = None
    ssim_best: float | None = None
    lpips_mean: float | None = None
    lpips_best: float | None = None
    label_acc: float | None = None
    recovered_share: float | None = None
    num_images: int | None = None
    iterations: int | None = None
    objective: float | None = None
    seconds: float | None = None
    psnr: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    image: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobResult:
    """A finished job: its record plus images in [0, 1] for the comparison grid
    (ground truth and matched reconstruction, same order), None when it failed, and the attack's
    own output ``reconstruction`` (b', C, H, W), normalised, unmatched: what the server knows."""

    record: LeakageRecord
    truth_unit: torch.Tensor | None = None
    recon_unit: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None


def plan_jobs(scenario: Scenario, params: dict[str, Any], observation: Observation, truth: GroundTruth,
              first_id: int) -> list[AttackJob]:
    """One job per attack in the scenario's plan for this tapped update (``params``: the
    resolved params dataclass per attack name)."""
    plan = scenario.attack
    return [AttackJob(first_id + i, name, params[name], observation, truth, scenario.defense.name,
                      plan.recovered_psnr, plan.timeout_s,
                      derive_seed(scenario.seed, "attack", name, observation.server_round, observation.client_id))
            for i, name in enumerate(plan.attacks)]


def failed_record(job: AttackJob, status: str, error: str, seconds: float | None = None) -> LeakageRecord:
    obs = job.observation
    return LeakageRecord(obs.server_round, obs.client_id, job.attack, job.defense, status, error=error,
                         seconds=seconds)


def run_job(job: AttackJob, device: torch.device, lpips: LpipsScorer | None,
            progress: Callable[[int, int, float], None] | None = None) -> JobResult:
    """:func:`run_jobs` with one job; ``progress(iteration, total, objective)``."""
    report = None if progress is None else (lambda _job_id, *tick: progress(*tick))
    return run_jobs([job], device, lpips, report)[0]


def run_jobs(jobs: list[AttackJob], device: torch.device, lpips: LpipsScorer | None,
             progress: Callable[[int, int, int, float], None] | None = None) -> list[JobResult]:
    """Run ``jobs`` in one launch — one job, or several of one attack with equal batch keys
    (``Attack.run_many``) — within their timeout (the earliest), then score each; never raises
    (a crash becomes a failed record, for every job of the launch when the attack itself failed).
    An attack that stopped at its deadline (``extras["stopped_early"]``, or it returned after the
    deadline) is scored on what it reached and recorded as "timeout". ``seconds`` is the launch's.
    ``progress(job_id, iteration, total, objective)``."""
    started = time.monotonic()
    attack = get_attack(jobs[0].attack)
    contexts = [AttackContext(device=device, seed=job.seed, deadline=started + job.timeout_s,
                              progress=None if progress is None else functools.partial(progress, job.job_id))
                for job in jobs]
    try:
        torch.manual_seed(jobs[0].seed)
        if len(jobs) == 1:
            recons = [attack.run(jobs[0].observation, jobs[0].params, contexts[0])]
        else:
            recons = attack.run_many([job.observation for job in jobs], jobs[0].params, contexts)
    except Exception as exc:  # noqa: BLE001 - a failed attack is a result, not a crash
        seconds = round(time.monotonic() - started, 3)
        return [_failed(job, exc, seconds) for job in jobs]
    seconds = time.monotonic() - started
    results = []
    for job, recon in zip(jobs, recons):
        try:
            results.append(_scored(job, recon, seconds, lpips))
        except Exception as exc:  # noqa: BLE001
            results.append(_failed(job, exc, round(seconds, 3)))
    return results


def _failed(job: AttackJob, exc: Exception, seconds: float) -> JobResult:
    detail = f"{type(exc).__name__}: {exc}"
    return JobResult(failed_record(job, "failed", f"{detail}\n{traceback.format_exc(limit=3)}", seconds))


def _scored(job: AttackJob, recon: Reconstruction, seconds: float, lpips: LpipsScorer | None) -> JobResult:
    obs = job.observation
    timed_out = bool(recon.extras.get("stopped_early")) or seconds >= job.timeout_s
    status, error = ("timeout", f"stopped at its deadline (timeout_s = {job.timeout_s:g}) after "
                                f"{recon.iterations} iterations") if timed_out else ("ok", None)
    domain = obs.domain
    truth_unit = domain.to_unit(job.truth.inputs.float().cpu())
    reconstruction = recon.inputs.detach().float().cpu()
    recon_unit = domain.to_unit(reconstruction)
    scores = score_reconstruction(recon_unit, truth_unit, recon.labels, job.truth.labels,
                                  job.recovered_psnr, lpips)
    record = LeakageRecord(
        obs.server_round, obs.client_id, job.attack, job.defense, status, error=error,
        psnr_mean=scores.psnr_mean, psnr_best=scores.psnr_best, ssim_mean=scores.ssim_mean,
        ssim_best=scores.ssim_best, lpips_mean=scores.lpips_mean, lpips_best=scores.lpips_best,
        label_acc=scores.label_acc, recovered_share=scores.recovered_share, num_images=scores.num_images,
        iterations=recon.iterations, objective=float(recon.objective), seconds=round(seconds, 3),
        psnr=scores.psnr, extras=dict(recon.extras))
    matched = torch.stack([recon_unit[m] if m is not None else torch.zeros_like(truth_unit[0])
                           for m in scores.matching]) if len(truth_unit) else recon_unit
    return JobResult(record, truth_unit, matched, reconstruction)


def store_result(run_dir: RunDirectory, result: JobResult) -> dict[str, Any]:
    """Append the record to ``leakage.jsonl`` and save its comparison grid; returns the record."""
    record = result.record
    if result.truth_unit is not None and result.recon_unit is not None:
        name = f"r{record.round:03d}_c{record.client:03d}_{record.attack}.png"
        save_comparison_grid(run_dir.reconstructions / name, result.truth_unit, result.recon_unit)
        record.image = f"{RECONSTRUCTIONS}/{name}"
    data = record.to_dict()
    run_dir.append(LEAKAGE, data)
    return data
