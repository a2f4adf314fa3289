"""``covidscan predict --engine ray``: batch prediction on Ray Data, resumable, one Parquet shard per block.

Paths are read into a Ray Dataset; ``map_batches`` sends each block to one of ``num_workers`` actors, each
holding one :class:`~covidscan.inference.Predictor` (the model loads once per actor, not per batch); the
rows land in ``OUT/shards/*.parquet``. Without ``address`` a local Ray uses this machine's cores, so the same
command works on a laptop and, with ``--address auto`` or ``ray://HOST:10001``, on a cluster.

A rerun on the same folder predicts only the images no shard has yet (a job killed half-way loses at most
the blocks being scored). An unreadable image is a row with its ``error``, never a failed job. When every
input has a row and there are at most :data:`MERGE_MAX_ROWS`, ``OUT/predictions.csv`` joins the shards in
input order with the same columns as in-process ``covidscan predict`` (group columns included).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidscan.errors import ConfigError, CovidscanError, StorageError
from covidscan.inference.predict import InputItem, collect_inputs, prediction_table
from covidscan.inference.predictor import Prediction, Predictor
from covidscan.models import Precision
from covidscan.outputs import ENCODING_ERRORS, check_output, replaced_file, run_files, write_csv
from covidscan.system import inaccessible

log = logging.getLogger(__name__)

BATCHES_PER_BLOCK = 4
"""Forward passes per block (and shard): within a block the actor decodes the next batch while the model runs
on this one, as in-process ``predict`` does over all its inputs; a block of one batch leaves nothing to
overlap."""
MERGE_MAX_ROWS = 1_000_000
"""Up to this many images the shards are also joined into one CSV (beyond, read the Parquet shards)."""
_TEXT = ("path", "label", "warnings", "error", "group_id", "known_error")
SHARDS = "shards"
MERGED = "predictions.csv"
_COLUMNS = (
    "index",
    "path",
    "p_covid",
    "label",
    "uncertain",
    "lungs_found",
    "ood_score",
    "warnings",
    "error",
    "group_id",
)


@dataclass(frozen=True)
class RayPrediction:
    """What a ``predict_on_ray`` call did."""

    out_dir: Path
    images: int  # inputs in all
    predicted: int  # predicted by this call
    resumed: int  # found in the shards of an earlier call
    errors: int  # rows with an error (unreadable, refused), over all shards
    merged: Path | None  # the joined CSV, when written


class _Scorer:
    """A Ray actor's callable: one Predictor, loaded once, scoring blocks of paths into shards.

    Each block's rows are written by the actor that scored them, to ``<first index>-<id>.parquet`` via a side
    file renamed into place, so a shard is either whole or absent. (Ray's ``write_parquet`` runs as tasks that
    each want a CPU, which the actors hold: no shard was written before every block was scored, so a killed
    job lost everything; asking for no CPU instead cost 2 workers on 2 cores a sixth of their rate.) The actor
    returns the rows written and, when the shard could not be written (a full disk), why."""

    def __init__(
        self, run_dir: str, shards: str, precision: Precision, batch_size: int, threads: int
    ) -> None:
        import torch

        torch.set_num_threads(threads)  # the actor's share of the node's cores, not all of them
        self.shards = Path(shards)
        self.predictor = Predictor.from_run(
            run_dir, precision=precision, batch_size=batch_size, workers=threads
        )

    def __call__(self, block: pd.DataFrame) -> pd.DataFrame:
        rows = self.score(block)
        # Indices count this call's inputs (a rerun with other inputs starts at 0 again): names of their own.
        shard = self.shards / f"{int(rows['index'].iloc[0]):012d}-{uuid.uuid4().hex[:12]}.parquet"
        try:
            with replaced_file(shard, "a shard of predictions ") as side:
                rows.to_parquet(side, index=False)
        except StorageError as exc:  # Ray would carry it to the caller as a traceback; the caller says it
            return pd.DataFrame({"rows": [0], "error": [str(exc)]})
        return pd.DataFrame({"rows": [len(rows)], "error": [""]})

    def score(self, block: pd.DataFrame) -> pd.DataFrame:
        """The block's rows in the shards' columns (text encoded)."""
        block = _decoded(block)
        groups = [g or None for g in block["group_id"]]
        known = {i: e for i, e in enumerate(block["known_error"]) if e}
        todo = [i for i in range(len(block)) if i not in known]
        paths = block["path"].tolist()
        scored = self.predictor.predict([paths[i] for i in todo], group_ids=[groups[i] for i in todo])
        preds = [Prediction(source=p, error=known.get(i), group_id=groups[i]) for i, p in enumerate(paths)]
        for i, pred in zip(todo, scored, strict=True):
            preds[i] = pred
        return _rows(block["index"].tolist(), preds)


def _encoded(table: pd.DataFrame) -> pd.DataFrame:
    """Text columns as UTF-8 bytes, a file name that is not UTF-8 as its own bytes: Ray and Parquet carry
    text as Arrow strings, which must be valid UTF-8 (such a name would fail the whole block)."""
    text = [c for c in _TEXT if c in table]
    return table.assign(
        **{
            c: [v.encode("utf-8", ENCODING_ERRORS) if isinstance(v, str) else None for v in table[c]]
            for c in text
        }
    )


def _decoded(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`_encoded` undone."""
    text = [c for c in _TEXT if c in table]
    return table.assign(
        **{
            c: pd.Series(
                [
                    bytes(v).decode("utf-8", ENCODING_ERRORS) if isinstance(v, bytes | bytearray) else None
                    for v in table[c]
                ],
                index=table.index,
                dtype=object,
            )
            for c in text
        }
    )


def _rows(indices: Sequence[int], preds: Sequence[Prediction]) -> pd.DataFrame:
    """Predictions as the shards' columns (missing values null, warnings joined by ``; ``), text encoded."""
    return _encoded(
        pd.DataFrame(
            {
                "index": np.asarray(indices, dtype=np.int64),
                "path": [p.source for p in preds],
                "p_covid": [np.nan if p.p_covid is None else p.p_covid for p in preds],
                "label": [p.label for p in preds],
                "uncertain": pd.array([p.uncertain for p in preds], dtype="boolean"),
                "lungs_found": pd.array([p.lungs_found for p in preds], dtype="boolean"),
                "ood_score": [np.nan if p.ood_score is None else p.ood_score for p in preds],
                "warnings": ["; ".join(p.warnings) for p in preds],
                "error": [p.error or "" for p in preds],
                "group_id": [p.group_id for p in preds],
            },
            columns=list(_COLUMNS),
        )
    )


def _done(shards: Path) -> pd.DataFrame:
    """The rows of earlier calls; a shard that cannot be read (a write cut off) is removed, its images
    predicted again."""
    frames = []
    for shard in sorted(shards.glob("*.parquet")):
        try:
            frames.append(pd.read_parquet(shard))
        except Exception as exc:  # pyarrow raises several types for a truncated file
            log.warning("removing unreadable shard %s (%s); its images are predicted again", shard, exc)
            shard.unlink()
    if not frames:
        return pd.DataFrame(columns=list(_COLUMNS))
    return _decoded(pd.concat(frames, ignore_index=True)).drop_duplicates("path", keep="last")


def _blocks(todo: Sequence[tuple[int, InputItem]], rows: int) -> list[pd.DataFrame]:
    """The (input position, image) pairs still to predict as blocks of ``rows`` rows, text encoded: what
    each actor call receives."""
    table = _encoded(
        pd.DataFrame(
            {
                "index": [i for i, _ in todo],
                "path": [item.path for _, item in todo],
                "group_id": [item.group_id or "" for _, item in todo],
                "known_error": [item.error or "" for _, item in todo],
            },
            dtype=object,
        )
    )
    return [table.iloc[i : i + rows] for i in range(0, len(table), rows)]


# Ray Client's words when the head could not start this connection's server process (worth a new try)
CLIENT_SERVER_FAILED = "Starting Ray client server failed"
CLIENT_SERVER_ATTEMPTS = 3


def _without_sigterm_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("SIGTERM handler is not set")


def _start_ray(address: str | None) -> Any:
    """Ray, connected to ``address`` or started locally with this machine's cores."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'covidscan[ray]'") from None
    if not ray.is_initialized():
        # No usage report to Ray's servers from a hospital's machine unless its administrator asks for it.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray Client streams the cluster side's log lines here; one, from connecting in a thread, means
        # nothing to a covidscan user: "SIGTERM handler is not set because current thread is not the main
        # thread."
        logging.getLogger("ray.util.client.logsclient").addFilter(_without_sigterm_note)
        local = {} if address else {"num_cpus": os.cpu_count() or 1}
        try:
            for attempt in range(1, CLIENT_SERVER_ATTEMPTS + 1):
                try:
                    ray.init(
                        address=address,
                        include_dashboard=False,
                        log_to_driver=False,
                        logging_level=logging.WARNING,
                        **local,
                    )
                    break
                except ConnectionError as exc:  # Ray Client raises ConnectionAbortedError for it
                    # Ray Client's head starts one server process per connection; on a busy head that
                    # process can die while starting, and the next connection gets a new one.
                    if CLIENT_SERVER_FAILED not in str(exc) or attempt == CLIENT_SERVER_ATTEMPTS:
                        raise
                    ray.shutdown()
                    time.sleep(2.0 * attempt)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            # A cluster with token authentication (on by default for `ray start --head` in Ray 2.60) ignores
            # a Ray Client without the token until the connection times out; Ray then says only "timeout".
            token = ("; a cluster with token authentication also needs RAY_AUTH_MODE=token here, and its "
                     "token in RAY_AUTH_TOKEN or ~/.ray/auth_token (`ray get-auth-token` on the head)"
                     if str(address).startswith("ray://") else "")
            raise ConfigError(f"cannot connect to Ray at {address!r}: {exc}; check --address{token}"
                              ) from None
    return ray


def predict_on_ray(
    run_dir: str | Path,
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    batch_size: int = 32,
    precision: Precision = "auto",
    progress: bool = True,
) -> RayPrediction:
    """Predict every image of ``inputs`` with ``run_dir`` on Ray; shards (and the joined CSV) in ``out_dir``.

    ``address``: ``auto`` (the cluster of this node, or ``RAY_ADDRESS``), ``ray://HOST:PORT`` (Ray Client:
    the job then runs as a task on the cluster, and the paths must be the same there and here), or None (a
    local Ray); ``num_workers``: actors, each with one Predictor (default: the cluster's CPUs);
    ``batch_size``: images per forward pass, :data:`BATCHES_PER_BLOCK` of them per block. See the module
    docstring for resuming and the output.
    """
    if (num_workers is not None and num_workers < 1) or batch_size < 1:
        raise ConfigError(
            f"--num-workers and --batch-size must be at least 1, got {num_workers} and {batch_size}"
        )
    run_dir, out_dir = Path(run_dir).resolve(), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; --engine ray writes a folder of Parquet shards")
    check_output(out_dir, [*run_files(run_dir), *([inputs] if isinstance(inputs, (str, Path)) else inputs)])
    # Loaded here too: a bad run fails at once, not inside Ray; its calibration groups the joined rows.
    predictor = Predictor.from_run(run_dir, engine="torch", fast=False)
    items = collect_inputs(inputs)
    shards = out_dir / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    done = _done(shards)
    seen = set(done["path"])
    todo = [(i, item) for i, item in enumerate(items) if item.path not in seen]
    if todo:
        ray = _start_ray(address)
        blocks = _blocks(todo, batch_size * BATCHES_PER_BLOCK)
        job = _Job(str(run_dir), str(shards.resolve()), blocks, num_workers, precision, batch_size)
        if ray.util.client.ray.is_connected():
            failed = _score_blocks_on_cluster(ray, job)
        else:
            failed = _score_blocks(job, progress=progress)
        if failed:
            raise StorageError(
                f"{failed[0]}; {len(failed)} of {len(blocks)} blocks of predictions could not be "
                f"written: the other {len(blocks) - len(failed)} are kept in {shards}, and a rerun "
                "predicts only the rest"
            )
        done = _done(shards)
    merged = _merge(predictor, items, done, out_dir) if len(items) <= MERGE_MAX_ROWS else None
    return RayPrediction(
        out_dir, len(items), len(todo), len(items) - len(todo), int((done["error"] != "").sum()), merged
    )


@dataclass(frozen=True)
class _Job:
    """What the actors need: the run, the shard folder, the blocks and how to score them."""

    run_dir: str
    shards: str
    blocks: list[pd.DataFrame]
    num_workers: int | None
    precision: Precision
    batch_size: int


def _score_blocks_on_cluster(ray: Any, job: _Job) -> list[str]:
    """:func:`_score_blocks` over Ray Client (``ray://``). This process is then no Ray worker, and Ray Data's
    executor needs one: the job runs as a task on the cluster, on no CPU of its own (the actors take them).

    The paths it was given are checked on the cluster's node first, by a task that imports no model library
    (seconds less on the worker): an actor that cannot load the run would fail the job with Ray's traceback,
    and an image folder the node lacks would give a row of errors per image."""
    image = next((p for b in map(_decoded, job.blocks)
                  for p, e in zip(b["path"], b["known_error"], strict=True) if not e), None)
    needed = [("the run", job.run_dir, os.R_OK), ("the output folder", job.shards, os.W_OK),
              *([("the image", image, os.R_OK)] if image else [])]
    lacking = ray.get(ray.remote(num_cpus=0)(inaccessible).remote(needed))
    if lacking is not None:
        node, paths = lacking
        each = "; ".join(f"{what} {path} is {state}" for what, path, state in paths)
        raise ConfigError(
            f"on the Ray cluster's node {node}, {each}: over --address ray:// the cluster reads the run and "
            "the images, and writes the shards, at the paths given here; put them at the same paths on its "
            "nodes (a shared file system), or run covidscan on a node of the cluster with --address auto"
        )
    try:
        return ray.get(ray.remote(num_cpus=0)(_score_blocks).remote(job, progress=False))
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, CovidscanError):
            raise exc.cause from None
        raise


def _score_blocks(job: _Job, *, progress: bool) -> list[str]:
    """Score the job's blocks on the Ray this process is connected to, each by one of the actors
    (:class:`_Scorer`) writing its shard; the errors of the blocks whose shards could not be written."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = progress
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = job.num_workers or cpus
    threads = max(1, cpus // workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's own deprecation notes, not the user's
        blocks_done = (
            ray.data.from_pandas(job.blocks)
            .map_batches(
                _Scorer,
                fn_constructor_kwargs={
                    "run_dir": job.run_dir,
                    "shards": job.shards,
                    "precision": job.precision,
                    "batch_size": job.batch_size,
                    "threads": threads,
                },
                batch_format="pandas",
                batch_size=job.batch_size * BATCHES_PER_BLOCK,
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=threads,
            )
            .to_pandas()
        )
    return [e for e in blocks_done["error"] if e]


def _merge(predictor: Predictor, items: list[InputItem], done: pd.DataFrame, out_dir: Path) -> Path | None:
    """The shards as one CSV in input order, with the group columns of in-process predict; None while
    some input has no row yet."""
    by_path = {row.path: row for row in done.itertuples(index=False)}
    if any(item.path not in by_path for item in items):
        return None
    preds = []
    for item in items:
        row = by_path[item.path]
        preds.append(
            Prediction(
                source=item.path,
                p_covid=None if pd.isna(row.p_covid) else float(row.p_covid),
                label=None if row.label is None or pd.isna(row.label) else str(row.label),
                uncertain=None if pd.isna(row.uncertain) else bool(row.uncertain),
                lungs_found=None if pd.isna(row.lungs_found) else bool(row.lungs_found),
                warnings=tuple(w for w in str(row.warnings).split("; ") if w),
                error=row.error or None,
                group_id=None if row.group_id is None or pd.isna(row.group_id) else str(row.group_id),
                ood_score=None if pd.isna(row.ood_score) else float(row.ood_score),
            )
        )
    df = prediction_table(preds, predictor.aggregate(preds), [item.true_label for item in items])
    return write_csv(df, out_dir / MERGED, "predictions to ")
