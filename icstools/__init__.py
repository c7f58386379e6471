"""icstools: measure internal covariate shift in PyTorch training.

Hooks attach to any ``torch.nn.Module`` and record per-unit activation statistics at scheduled
optimizer steps into an xarray dataset, streamed to a crash-safe Zarr store.

Examples
--------
>>> import torch, icstools
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Sigmoid(), torch.nn.Linear(8, 2))
>>> icstools.list_sites(model)[:2]
['0:input', '0:output']
"""

__version__ = "0.1.0"

from icstools.analysis import AnalysisError, ICSAccessor  # registers ds.ics
from icstools.analysis.compare import compare
from icstools.functional.gradients import check_scale_invariance, gradient_ics, landscape_probe
from icstools.liveview import live
from icstools.recording.errors import (
    RecorderError,
    ResumeWarning,
    SharedModuleWarning,
    SitesNotRecordedWarning,
)
from icstools.recording.recorder import Recorder
from icstools.schedules import as_schedule, at_steps, every, log_spaced
from icstools.sites import SiteSelectionError, list_sites, select_sites
from icstools.store import open_run

__all__ = [
    "AnalysisError",
    "ICSAccessor",
    "Recorder",
    "RecorderError",
    "ResumeWarning",
    "SharedModuleWarning",
    "SiteSelectionError",
    "SitesNotRecordedWarning",
    "__version__",
    "as_schedule",
    "at_steps",
    "check_scale_invariance",
    "compare",
    "every",
    "gradient_ics",
    "landscape_probe",
    "list_sites",
    "live",
    "log_spaced",
    "open_run",
    "select_sites",
]
