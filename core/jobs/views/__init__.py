"""What the pages show, as page-ready records: one view function per page or panel.

Each view loads what it shows with its relationships in the same query (a list of runs is one
statement however long it is) and returns frozen dataclasses, so that no ORM object leaves the
session and no page writes SQL (the pattern of MLflow's tracking store and its entities). The rules
behind what a page shows live here too: a run's protocol label, how far it has got, which run has
the best honest accuracy.

By topic:

  runs.py        RunRow and RunCurves: the runs as listed, their epochs, the best honest run
  results.py     RunResults: what the Runs page shows of a run that has ended
  datasets.py    datasets and their versions, augmentation presets, the Augmentation page's preview image
  workers.py     the training worker's panel and the notice of failed runs
  compare.py     runs side by side, approved models, the prediction log's History tab
  home.py        Home's headline: the best run on specimens it never saw, beside colour alone;
                 the models in use with their field accuracy
  slides.py      whole-slide jobs as the Predict page and the API show them, their heat maps
  formatting.py  figures and messages in the pages' words

The pages import this package (`from core.jobs import views`; `views.run_rows(...)`), which names
every public record and view below. No torch: listing runs does not load the training code (what
the machine can train on, which needs torch, is core/jobs/estimate.py's). In core/jobs, the top of
the flow, because a run's record draws on every stage (its config, its split's label, its metrics).
"""

from core.jobs.views.compare import (
    ApprovalPanel,
    PredictionHistory,
    SettingDifference,
    approval_panel,
    prediction_history,
    setting_differences,
)
from core.jobs.views.datasets import (
    DatasetDetail,
    DatasetRow,
    ImageRow,
    PresetRow,
    VersionDiff,
    VersionSummary,
    dataset_detail,
    dataset_rows,
    dataset_versions,
    preset_rows,
    preview_image,
    version_diff,
)
from core.jobs.views.formatting import (
    accuracy_text,
    duration_text,
    failure_message,
    interval_text,
    plain_calibration_words,
    seconds_since,
    speed_text,
    without_paths,
    without_paths_in,
)
from core.jobs.views.home import BestGrouped, InUse, best_grouped, models_in_use
from core.jobs.views.results import FoldResults, PredictionRow, RunResults, fold_spread_words, run_results
from core.jobs.views.runs import (
    ACTIVE,
    PAPER,
    PAPER_AUGMENTATION,
    STATUSES,
    EpochRow,
    RunCurves,
    RunRow,
    active_runs,
    best_honest_run,
    last_launched_config,
    run_curve,
    run_curves,
    run_row,
    run_rows,
    sessions,
    setting_words,
)
from core.jobs.views.slides import (
    SlideJobView,
    SlideVerdict,
    load_heat_map,
    overlay,
    slide_job,
    slide_jobs,
    slide_models,
)
from core.jobs.views.workers import (
    NOTICE_HOURS,
    FailureNotice,
    TrainingNow,
    WorkerPanel,
    WorkerRow,
    failure_notices,
    worker_panel,
)

__all__ = [
    "InUse",
    "models_in_use",
    "SlideJobView",
    "SlideVerdict",
    "load_heat_map",
    "overlay",
    "slide_job",
    "slide_jobs",
    "slide_models",
    "ACTIVE",
    "NOTICE_HOURS",
    "PAPER",
    "PAPER_AUGMENTATION",
    "STATUSES",
    "ApprovalPanel",
    "BestGrouped",
    "DatasetDetail",
    "DatasetRow",
    "EpochRow",
    "FailureNotice",
    "FoldResults",
    "ImageRow",
    "PredictionHistory",
    "PredictionRow",
    "PresetRow",
    "RunCurves",
    "RunResults",
    "RunRow",
    "SettingDifference",
    "TrainingNow",
    "VersionDiff",
    "VersionSummary",
    "WorkerPanel",
    "WorkerRow",
    "accuracy_text",
    "active_runs",
    "approval_panel",
    "best_grouped",
    "best_honest_run",
    "dataset_detail",
    "dataset_rows",
    "dataset_versions",
    "duration_text",
    "failure_message",
    "failure_notices",
    "fold_spread_words",
    "interval_text",
    "last_launched_config",
    "plain_calibration_words",
    "prediction_history",
    "preset_rows",
    "preview_image",
    "run_curve",
    "run_curves",
    "run_results",
    "run_row",
    "run_rows",
    "seconds_since",
    "sessions",
    "setting_differences",
    "setting_words",
    "speed_text",
    "version_diff",
    "without_paths",
    "without_paths_in",
    "worker_panel",
]
