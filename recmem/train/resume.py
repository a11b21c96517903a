"""What a checkpoint must agree on with the job that resumes it, without torch (a Ray driver checks it).

Every checkpoint records the job's *resume key*: the config that fixes the model's shapes and the
meaning of the saved data position (``model.*``, ``data.schema.*``, ``data.batch_size``) and the
fingerprint of the training split (its part files, row groups and their sizes). A resume compares the
newest checkpoint's key with its own before the first step: a changed model config is refused (the
differing keys are printed), and so is changed training data, unless ``train.resume_changed`` says
the change is meant; the saved position counts batches, so over other data it would silently skip
or repeat rows.
"""

from __future__ import annotations

from typing import Any

from recmem.config import Config, ConfigError, to_dict
from recmem.data.layout import SplitIndex
from recmem.tracking.logger import flatten


class ResumeError(ConfigError):
    """The checkpoint to resume was written for another model config or other training data."""


def resume_key(cfg: Config, train: SplitIndex) -> dict[str, Any]:
    """``{"config": {dotted key: value}, "data": {...}}``: what a checkpoint of this job records."""
    config = flatten({"model": to_dict(cfg.model), "data": {"schema": to_dict(cfg.data.schema),
                                                             "batch_size": cfg.data.batch_size}})
    data = {"root": train.root, "files": len(train.paths), "rows": train.rows, "fingerprint": train.fingerprint}
    return {"config": config, "data": data}


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], allow_changed: bool,
                 checkpoint: str) -> list[str]:
    """Compare the resume key ``saved`` in ``checkpoint`` with this job's ``current`` one.

    Returns:
        The differences as lines (empty when they agree); with ``allow_changed`` the caller prints
        them and resumes anyway.

    Raises:
        ResumeError: they differ (or the checkpoint has no key) and ``allow_changed`` is false.
    """
    if saved is None:
        problems = ["the checkpoint records no model config or data fingerprint (written by an older recmem)"]
    else:
        old, new = saved["config"], current["config"]
        problems = [f"{k}: {old.get(k, '<absent>')} in the checkpoint, {new.get(k, '<absent>')} now"
                    for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        a, b = saved["data"], current["data"]
        if a["fingerprint"] != b["fingerprint"]:
            problems.append(f"training data: {a['files']} files / {a['rows']:,} rows under {a['root']} "
                            f"(fingerprint {a['fingerprint']}) in the checkpoint, {b['files']} files / "
                            f"{b['rows']:,} rows under {b['root']} (fingerprint {b['fingerprint']}) now")
    if problems and not allow_changed:
        raise ResumeError(
            f"{checkpoint} does not match this job, refusing to resume:\n  " + "\n  ".join(problems) +
            "\n(train.resume=false starts afresh; train.resume_changed=true resumes anyway, e.g. after "
            "appending data on purpose)")
    return problems
