"""moewm's SLURM launcher (``hydra/launcher=slurm_local``, ``slurm_gpu``): submitit's, made to end and to resume.

Hydra only instantiates launchers that live in the ``hydra_plugins`` namespace, hence this package
outside ``moewm``; what it decides about a job's folder lives in :mod:`moewm.app.cluster`.

Two things differ from ``hydra_submitit_launcher``'s ``SlurmLauncher``:

- a job that the scheduler ends before it returns (``scancel``, the time limit, out of memory, a node
  failure) becomes a failed row (``metrics.json``: ``status=failed``, ``error`` with SLURM's state, e.g.
  ``CANCELLED by 0`` or ``TIMEOUT``) instead of an exception that drops the whole sweep and its summary;
  the other jobs are waited for and kept. The state comes from ``sacct``: the cluster needs accounting
  (``scripts/slurm_local.sh`` starts slurmdbd for it), or submitit never learns that a killed job ended;
- ``skip_done`` (default true): rerunning a sweep with the same ``hydra.sweep.dir`` submits only the jobs
  whose folder holds no finished run (``metrics.json`` with ``status=ok`` and the same overrides).

No ``from __future__ import annotations`` here: Hydra's plugin scan runs this module outside
``sys.modules``, where a dataclass cannot resolve string annotations.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger(__name__)


@dataclass
class MoewmSlurmQueueConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.moewm_launcher.MoewmSlurmLauncher"
    skip_done: bool = True  # resume: a rerun into the same hydra.sweep.dir submits only the unfinished jobs


ConfigStore.instance().store(group="hydra/launcher", name="moewm_slurm", node=MoewmSlurmQueueConf, provider="moewm")


class MoewmSlurmLauncher(SlurmLauncher):
    def __init__(self, skip_done: bool = True, **params: Any) -> None:
        super().__init__(**params)
        self.skip_done = bool(skip_done)

    def _job_dir(self, overrides: Sequence[str], idx: int) -> Tuple[Path, Any]:
        """The folder job ``idx`` writes to (``hydra.sweep.dir`` / ``hydra.sweep.subdir``) and its seed."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = idx
        HydraConfig.instance().set_config(cfg)  # a subdir may use ${hydra:...}
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir), cfg.get("seed")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from hydra.core.singleton import Singleton
        from omegaconf import OmegaConf

        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from moewm.app.cluster import finished, forget_failure, record_lost_job

        assert self.config is not None and len(job_overrides) > 0
        singleton_state = Singleton.get_state()  # before _job_dir sets HydraConfig for the launcher's own use
        init_params = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init_params["slurm_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in baseparams else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in {"submitit_folder", "max_num_timeout"}})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")

        returns: List[Any] = [None] * len(job_overrides)
        todo, params = [], []
        resuming = self.skip_done and any(sweep_dir.glob("**/metrics.json"))  # composing each job's config costs ~0.5 s
        for pos, overrides in enumerate(job_overrides):
            idx = initial_job_idx + pos
            job_dir, seed = self._job_dir(overrides, idx) if resuming else (None, None)
            if resuming and finished(job_dir, overrides):
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} (finished in {job_dir}: not submitted again)")
                returns[pos] = JobReturn(overrides=list(overrides), working_dir=str(job_dir), status=JobStatus.COMPLETED)
                continue
            if resuming:
                forget_failure(job_dir)  # a rerun that is lost again must not show the old reason
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            todo.append((pos, job_dir, seed))
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", singleton_state))
        jobs = executor.map_array(self, *zip(*params)) if params else []
        for job, (pos, job_dir, seed) in zip(jobs, todo):
            try:
                returns[pos] = job.results()[0]
                continue
            except submitit.core.utils.UncompletedJobError:
                error = f"SLURM job {job.job_id} ended {job.state} before returning (its log: {job.paths.stderr})"
            except submitit.core.utils.FailedJobError as err:
                last = [line for line in str(err).splitlines() if line.strip()][-1:] or ["?"]
                error = f"SLURM job {job.job_id} raised: {last[0]} (its log: {job.paths.stderr})"
            if job_dir is None:
                job_dir, seed = self._job_dir(job_overrides[pos], initial_job_idx + pos)
            if record_lost_job(job_dir, job_overrides[pos], error, {"seed": seed, "slurm_job_id": job.job_id}):
                log.error(f"#{initial_job_idx + pos}: {error}")
            returns[pos] = JobReturn(overrides=list(job_overrides[pos]), working_dir=str(job_dir), status=JobStatus.COMPLETED)
        return returns
