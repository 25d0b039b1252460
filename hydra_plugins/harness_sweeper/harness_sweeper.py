"""A Hydra sweeper that collapses a sweep into vmapped programs, and resumes killed sweeps.

``harness -m optim.lr=1e-4,1e-3,1e-2 seed=0,1,2 model.width=64,128`` expands like Hydra's basic sweeper (``a,b,c``,
``range()``, ``choice()``, ``glob()``: it *is* the basic sweeper's expansion). Then:

* **Collapse.** Points that differ only in values the training engine traces (learning rate, weight decay, seed)
  form a group; each group is launched as ONE job that trains all its points as members of the same vmapped
  programs (:mod:`harness.sweeps.collapse`). Points that differ in anything else (width, depth, data, optimizer
  kind, ...) change shapes or code and go to separate groups. Each point still gets its own directory
  ``<sweep dir>/<point number>/`` with ``.hydra/config.yaml``, ``.hydra/overrides.yaml``, ``report.json`` and its
  own W&B run, exactly as if it had run alone. ``collapse=false`` launches one job per point instead.
* **Resume.** A point whose directory already holds a complete ``report.json`` for the same overrides is skipped,
  so the same command after a crash or ``kill -9`` runs only what is missing. Reports are written atomically
  (rename), so "complete" is never a half-written file. The default sweep directory is derived from the command's
  overrides (see ``harness.cli``), which is what makes "the same command" find it again.

Works with any launcher (basic in-process, joblib, submitit, ray): a group is an ordinary Hydra job.
"""


import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

# Config keys whose values the training engine traces (harness.engine.train.Hparams): sweep points that differ only
# in these share every compiled program. Anything else may change shapes or code.
COLLAPSIBLE_KEYS = ("optim.lr", "optim.weight_decay", "seed")
# Exit codes of the jobs this process launched (the CLI exits with the worst): jobs in other processes (joblib,
# submitit) report theirs only through their JobReturn.
JOB_CODES: List[int] = []
EXIT_INTERNAL = 3
GROUP_KEY = "harness_collapse_group"


@dataclasses.dataclass
class HarnessSweeperConf:
    _target_: str = "hydra_plugins.harness_sweeper.harness_sweeper.HarnessSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    collapsible: List[str] = dataclasses.field(default_factory=lambda: list(COLLAPSIBLE_KEYS))


ConfigStore.instance().store(group="hydra/sweeper", name="harness", node=HarnessSweeperConf, provider="harness")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def group_points(points: Sequence[Sequence[str]], collapsible: Sequence[str]) -> List[List[int]]:
    """Indices of points grouped by their non-collapsible overrides, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, point in enumerate(points):
        static = tuple(o for o in point if _key(o) not in collapsible)
        groups.setdefault(static, []).append(i)
    return list(groups.values())


def point_complete(point_dir: Path, overrides: Sequence[str]) -> bool:
    """A point is done when its report.json exists and was produced for these same overrides."""
    report, recorded = point_dir / "report.json", point_dir / ".hydra" / "overrides.yaml"
    if not report.is_file() or not recorded.is_file():
        return False
    try:
        json.loads(report.read_text())
        return list(OmegaConf.load(recorded)) == list(overrides)
    except Exception:
        return False  # unreadable: run it again


def record_job_codes(results) -> None:
    """Collect each job's exit code; a job that raised counts as an internal error (its error is logged)."""
    from hydra.core.utils import JobStatus

    for r in results:
        if r.status == JobStatus.FAILED:
            log.error(f"sweep job failed: {r._return_value!r}")
            JOB_CODES.append(EXIT_INTERNAL)
        else:
            value = r.return_value
            JOB_CODES.append(value if isinstance(value, int) else 0)


def _quote(value: str) -> str:
    """Quote a path for Hydra's override grammar (paths may hold '=', ',', spaces)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class HarnessSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None,
                 collapsible: Sequence[str] = COLLAPSIBLE_KEYS):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.collapsible = tuple(collapsible)

    def _expand(self, arguments: List[str]) -> list[list[str]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        return self.split_arguments(overrides, None)[0]

    def _write_point(self, sweep_dir: Path, index: int, overrides: list[str]) -> dict[str, Any]:
        """Compose one point's config the way its own job would and record it in the point's directory."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
                   if not k.startswith("hydra")}
        point_dir = sweep_dir / str(index)
        (point_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
        OmegaConf.save(task_cfg, point_dir / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(overrides)), point_dir / ".hydra" / "overrides.yaml")
        return {"index": index, "dir": str(point_dir.resolve()), "overrides": list(overrides), "choices": choices}

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        points = self._expand(arguments)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        todo = [i for i, p in enumerate(points) if not point_complete(sweep_dir / str(i), p)]
        if len(todo) < len(points):
            log.info(f"Resuming {sweep_dir}: {len(points) - len(todo)} of {len(points)} points are complete")
        if not todo:
            return []

        # Every job gets the sweep directory as resolved here: its own config would re-resolve it from its own
        # (point) overrides and land elsewhere.
        pinned = _quote(str(sweep_dir.resolve()))
        collapse = bool(self.config.get("collapse", True))
        if not collapse:
            # One job per point; the explicit subdir keeps point numbers stable when resuming skips some.
            batch = [list(points[i]) + [f"hydra.sweep.dir={pinned}", f"hydra.sweep.subdir={i}"] for i in todo]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=0)
            record_job_codes(results)
            return [results]

        groups = group_points([points[i] for i in todo], self.collapsible)
        batch = []
        group_dir = sweep_dir / ".groups"
        group_dir.mkdir(exist_ok=True)
        for g, members in enumerate(groups):
            indices = [todo[m] for m in members]
            spec = {"sweep_dir": str(sweep_dir.resolve()),
                    "points": [self._write_point(sweep_dir, i, points[i]) for i in indices]}
            path = group_dir / f"group-{indices[0]}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(spec, indent=2))
            os.replace(tmp, path)
            batch.append(list(points[indices[0]]) + [f"+{GROUP_KEY}={_quote(str(path.resolve()))}",
                                                      f"hydra.sweep.dir={pinned}",
                                                      f"hydra.sweep.subdir=.groups/{indices[0]}"])
            log.info(f"Group {g}: points {indices} run as one vmapped job")
        self.validate_batch_is_legal(batch)
        results = self.launcher.launch(batch, initial_job_idx=0)
        record_job_codes(results)
        return [results]


# The default sweep directory is named by harness_sweep_id (a hash of the command's overrides).
import harness.sweeps.resolvers  # noqa: E402,F401
