"""The settings of a preparation run (`PrepareConfig`, in the project's configuration dialect: pipeline/settings.py),
where a SLURM array task gets its index, and the error a preparation raises."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from pipeline.settings import doc


class PrepareError(RuntimeError):
    """Preparation failed; the message says which units or inputs and why."""


@dataclass
class PrepareConfig:
    """Settings of one preparation run (`launch/prepare_data.py --help` lists them). Fields marked (plan) are
    part of the dataset's identity: a re-run into the same output folder must use the same values."""

    inputs: list = doc("input specs: file, folder, glob, hf:NAME or disk:FOLDER, with #key=value options "
                       "(see sources.py)", default_factory=list)
    output: str = doc("dataset folder", "runs/sample/data")
    tokenizer: str = doc("(plan) Hugging Face name or folder, or a SentencePiece .model file", "bert-base-uncased")
    workers: int = doc("processes; 1 lets the tokenizer use its own threads on all cores", 1)
    text_field: str = doc("(plan) default field of JSON / Parquet / dataset records", "text")
    text_mode: str = doc("(plan) plain text: documents separated by blank lines, or one per line", "paragraphs",
                         choices=("paragraphs", "lines"))
    valid_fraction: float = doc("(plan) share of documents in the validation split", 0.005)
    split_seed: str = doc("(plan) salt of the document hash that assigns splits", "distil")
    unit_mb: float | None = doc("(plan) input MiB per unit/shard; default: auto (corpus/64, 1..64 MiB)", None)
    max_doc_chars: int = doc("(plan) longer documents are cut into pieces at whitespace", 1_000_000)
    max_record_mb: int = doc("(plan) JSON records longer than this are skipped", 64)
    max_junk_fraction: float = doc("(plan) documents with more junk characters are dropped as binary", 0.1)
    on_bad_file: str = doc("an unreadable file stops the run (error), or is left out and counted (skip)", "error",
                           choices=("error", "skip"))
    verify_existing: str = doc("how completed units are checked on resume: full (sha256) or size", "full",
                               choices=("full", "size"))
    array_task: int = doc("this task's index in a SLURM array (default: from SLURM_ARRAY_TASK_ID)", 0)
    array_count: int = doc("tasks in the array (default: from the SLURM_ARRAY_* variables)", 1)
    overwrite: bool = doc("delete an existing dataset in the output folder first", False)
    join: bool = doc("write manifest.json at the end (single task only)", True)
    progress: bool = doc("show a progress bar", True)
    command: list = doc("the command line recorded in the plan", default_factory=lambda: list(sys.argv))

    def problems(self) -> list[str]:
        p = []
        if not self.inputs:
            p.append("inputs: give at least one --input")
        if self.workers < 1:
            p.append(f"workers: must be >= 1, got {self.workers}")
        if not 0 <= self.valid_fraction < 1:
            p.append(f"valid_fraction: must be in [0, 1), got {self.valid_fraction}")
        if not 0 <= self.array_task < max(self.array_count, 1):
            p.append(f"array_task: must be in [0, {self.array_count}), got {self.array_task}")
        if self.overwrite and self.array_count > 1:
            p.append("overwrite: not allowed in an array (tasks would delete each other's work); clear the "
                     "folder before submitting")
        if self.unit_mb is not None and self.unit_mb <= 0:
            p.append(f"unit_mb: must be > 0, got {self.unit_mb}")
        if self.max_doc_chars < 1000:
            p.append(f"max_doc_chars: must be >= 1000, got {self.max_doc_chars}")
        return p


def array_task_from_env(env=os.environ) -> tuple[int, int] | None:
    """(task index, task count) of a SLURM array job, counted from the array's first index; None outside one."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = int(env["SLURM_ARRAY_TASK_ID"])
    lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    elif "SLURM_ARRAY_TASK_MAX" in env:
        count = int(env["SLURM_ARRAY_TASK_MAX"]) - lo + 1
    else:
        raise PrepareError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX")
    step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
    if step != 1:
        raise PrepareError(f"array step {step} is not supported: submit --array=0-{count - 1} (step 1)")
    return task - lo, count
