"""The run directory of ``python -m specext.analyze``: atomic writers, the fingerprint that
``--resume`` checks, the checkpoint state, and the CSV files.

Nothing is ever written half: every file goes to a temporary name, is synced, and is
renamed into place. A killed run leaves its last checkpoint in ``OUT/.state``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from specext.probes.probeset import ProbeSet

STATE = ".state"

PathLike = Union[str, os.PathLike]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``path`` atomically (temporary name, fsync, rename). On failure (a full disk,
    a read-only folder) the temporary file is removed and the error names ``path``."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()  # host: writing a file
    raise TypeError(f"cannot serialise {type(o).__name__}")


def write_safetensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, _sorted_header(data))


def _sorted_header(data: bytes) -> bytes:
    """The same file with its header's metadata in sorted key order: safetensors writes the
    metadata from a hash map, in a different order each run; sorted, identical inputs give
    identical bytes. Only the header's order changes (offsets are relative to the data)."""
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8 : 8 + n])
    meta = head.pop("__metadata__", None)
    ordered = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(sorted(head.items()))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def read_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def sha256_file(path: PathLike, limit: int = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            n = 1 << 20 if remaining is None else min(1 << 20, remaining)
            if n == 0:
                break
            b = f.read(n)
            if not b:
                break
            h.update(b)
            if remaining is not None:
                remaining -= len(b)
    return h.hexdigest()


WEIGHTS_CACHE = ".weights-sha256.json"


def weights_fingerprint(files: Iterable[Path], cache: Optional[Path] = None) -> str:
    """Hash of every safetensors file's name and bytes (header and tensors: a fine-tune of the
    same base differs). Each file's SHA-256 is cached in ``cache`` (a JSON file in the run
    directory) keyed by its resolved path, size and modification time (``st_mtime_ns``), so a
    resume does not rehash a 140 GB checkpoint; a changed file is hashed again."""
    entries: Dict[str, dict] = {}
    if cache is not None and cache.is_file():
        try:
            loaded = json.loads(cache.read_text())
            entries = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError, UnicodeDecodeError):
            entries = {}  # a damaged cache is only a cache: hash again
    h = hashlib.sha256()
    changed = False
    for p in sorted(files):
        st = p.stat()
        key = str(p.resolve())
        e = entries.get(key)
        if isinstance(e, dict) and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns \
                and isinstance(e.get("sha256"), str):
            digest = e["sha256"]
        else:
            digest = sha256_file(p)  # streamed in 1 MiB chunks
            entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            changed = True
        h.update(p.name.encode() + b"\0" + digest.encode() + b"\n")
    if cache is not None and changed:
        try:
            write_json(cache, entries)
        except OSError:
            pass  # an unwritable cache costs a rehash next time, nothing else
    return h.hexdigest()


# ---------------------------------------------------------------------------- fingerprint


def fingerprint(cfg, probe: ProbeSet, model_dir: Path, cache: Optional[Path] = None) -> Dict[str, object]:
    """What must match for --resume to continue a run (anything that changes results). The
    weights enter by their bytes (:func:`weights_fingerprint`, cached in ``cache``)."""
    files = sorted(model_dir.glob("*.safetensors"))
    probe_src = probe.questions[0].source.rsplit(":", 1)[0] if probe.questions else ""
    keys = ("probe", "dtype", "batch_size", "max_concepts", "positions", "stat", "seed", "open_ended",
            "max_new_tokens", "chunk_size", "null_permutations", "random_twin")
    opts = {k: getattr(cfg, k) for k in keys}
    opts["pss"] = asdict(cfg.pss_config) if cfg.pss else None
    fp = {
        "options": opts,
        "model_config_sha256": sha256_file(model_dir / "config.json"),
        "weights_sha256": weights_fingerprint(files, cache) if files else None,
        "probe_sha256": sha256_file(probe_src) if probe_src and Path(probe_src).is_file() else None,
        "questions": len(probe.questions),
    }
    return json.loads(json.dumps(fp))  # as it reads back from progress.json (tuples become lists)


# ---------------------------------------------------------------------------- directory

LOCK = ".lock"


def check_writable(out: Path) -> None:
    """Create ``out`` and write and remove a probe file in it, before the model is loaded
    (a read-only ``--out`` would otherwise fail at the first checkpoint, after the scoring)."""
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"specext")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"--out {out} is not a writable directory: {e.strerror or e}") from None


def missing_root(out: Path) -> Optional[Path]:
    """The topmost folder of ``out`` (``out`` itself or an ancestor) that does not exist yet,
    i.e. what :func:`check_writable` will create; None when ``out`` exists."""
    out = Path(out).absolute()
    if out.exists():
        return None
    root = out
    while not root.parent.exists() and root.parent != root:
        root = root.parent
    return root


def _remove(paths, *, ignore_errors: bool = False) -> None:
    """Delete each path: a directory (not a link to one) with everything in it, anything
    else as a file. ``ignore_errors``: go on past what cannot be deleted (a best-effort
    cleanup) instead of raising."""
    import shutil

    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=ignore_errors)
        else:
            p.unlink(missing_ok=ignore_errors)


def discard_new(out: Path, made: Path, lock: "RunLock", keep: Sequence[str] = (STATE, "summary.json")) -> None:
    """Remove a run directory this run created (``made``: the topmost folder it created, from
    :func:`missing_root`) when the run failed before its first checkpoint: nothing in it is
    worth keeping (e.g. the model's checkpoint is damaged). A directory holding any of
    ``keep`` is kept: analyze's checkpoint (``OUT/.state``, kept for ``--resume``) or finished
    run (``summary.json``); finetune passes its own (``original.json``, ``results.json``).
    Called holding ``lock``, which it releases."""
    out = Path(out).absolute()
    if any((out / name).exists() for name in keep):  # a checkpoint, or a finished run
        return
    _remove((p for p in out.iterdir() if p.name != LOCK), ignore_errors=True)
    lock.release()
    (out / LOCK).unlink(missing_ok=True)
    d = out
    while True:  # out, then each parent this run created, while empty
        try:
            d.rmdir()
        except OSError:
            return
        if d == made or d.parent == d:
            return
        d = d.parent
# specext's bookkeeping in a run directory: the lock (held by this run while it checks),
# the weights' hash cache (valid whatever run it served) and the writability probe.
_BOOKKEEPING = (LOCK, WEIGHTS_CACHE)


def _own_entries(out: Path) -> List[Path]:
    """What ``out`` holds besides specext's bookkeeping files."""
    return sorted(p for p in out.iterdir() if p.name not in _BOOKKEEPING and not p.name.startswith(".write-test-"))


def looks_like_run(out: Path) -> bool:
    """Whether ``out`` is a specext run directory: a config.json written by specext (its
    ``options`` and ``fingerprint``), a ``summary.json`` beside it, or a checkpoint in ``.state``."""
    if (out / STATE).is_dir():
        return True
    doc = json_dict(out / "config.json")
    return doc is not None and isinstance(doc.get("options"), dict) and "fingerprint" in doc


def json_dict(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing, unreadable, not JSON or not
    an object."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


# The files of python -m specext.finetune's run directory that mark it as one: the original
# model's evaluation (written once it is done) and the experiment's table (written last).
FINETUNE_MARKERS = ("original.json", "results.json")


def looks_like_finetune(out: Path) -> bool:
    """Whether ``out`` is a ``specext.finetune`` run directory: its ``original.json`` or
    ``results.json`` is finetune's (a ``fingerprint`` and the vector ``selection``)."""
    for name in FINETUNE_MARKERS:
        doc = json_dict(out / name)
        if doc is not None and isinstance(doc.get("fingerprint"), dict) and isinstance(doc.get("selection"), dict):
            return True
    return False


def finetune_finished(out: Path) -> bool:
    """Whether ``out`` holds a complete finetune experiment: its ``results.json`` (written
    last) with the strategy x metric ``table``."""
    doc = json_dict(out / "results.json")
    return doc is not None and isinstance(doc.get("fingerprint"), dict) and isinstance(doc.get("table"), list)


KINDS = {"analyze": "python -m specext.analyze", "finetune": "python -m specext.finetune"}


def run_kind(out: Path) -> Optional[str]:
    """The kind of specext run ``out`` holds: ``analyze`` (:func:`looks_like_run`),
    ``finetune`` (:func:`looks_like_finetune`), or None (not a specext run directory)."""
    if looks_like_run(out):
        return "analyze"
    if looks_like_finetune(out):
        return "finetune"
    return None


def _describe(out: Path, kind: str) -> str:
    """``a finished python -m specext.KIND run (its marker)`` or ``an unfinished ...``."""
    if kind == "analyze":
        done, marker = (out / "summary.json").is_file(), "summary.json"
    else:
        done, marker = finetune_finished(out), "results.json"
    return (f"a finished {KINDS[kind]} run ({marker})" if done
            else f"an unfinished {KINDS[kind]} run (no complete {marker})")


def _checkpoint(out: Path) -> bool:
    st = out / STATE
    return (st / "progress.json").is_file() or any(st.glob("rank-*/progress.json"))


def prepare_out(out: Path, *, resume: bool = False, overwrite: bool = False, kind: str = "analyze") -> None:
    """A run directory never mixes two runs, nor two kinds of run (``kind``: ``analyze`` or
    ``finetune``, the command about to write it). ``out`` may be used when it is empty
    (besides specext's lock and weights-hash cache), or with ``resume`` when it holds a run
    of the same kind to continue (analyze: a checkpoint; finetune: an experiment, finished or
    not), whose fingerprint the resume then checks (the same configuration), or nothing yet.
    Otherwise ``overwrite`` clears it first, but only when it looks like a specext run
    directory of either kind (:func:`run_kind`): a folder of other files is never deleted.
    Anything else raises ``ValueError`` saying what ``out`` holds and what to do."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not out.is_dir():
        return
    entries = _own_entries(out)
    if not entries:
        return
    names = ", ".join(p.name for p in entries[:8]) + (" ..." if len(entries) > 8 else "")
    found = run_kind(out)
    is_run = found is not None
    if found is not None and found != kind:
        if overwrite:
            pass  # cleared below: a specext run, whichever kind
        elif resume:
            raise ValueError(f"--resume: --out {out} holds {_describe(out, found)}, not a {KINDS[kind]} run: "
                             f"--resume continues only a {KINDS[kind]} run of the same inputs; use another --out, or "
                             f"--overwrite to replace it")
        else:
            raise ValueError(f"--out {out} holds {_describe(out, found)}: {names}; a run directory holds one run only: "
                             f"pass --overwrite to replace it, or use another --out")
    elif kind == "finetune" and not overwrite:
        if not is_run:
            raise ValueError(f"--out {out} is not empty and not a specext run directory (it holds {names}); a run "
                             f"directory holds one run only: use another --out")
        if resume:
            return  # the experiment's markers are checked against this run's fingerprint next
        if finetune_finished(out):
            raise ValueError(f"--out {out} holds {_describe(out, kind)}: {names}; a run "
                             f"directory holds one run only: pass --overwrite to replace it, --resume to keep its "
                             f"finished runs (same inputs only), or use another --out")
        raise ValueError(f"--out {out} holds {_describe(out, kind)}: {names}; continue it with --resume, start it "
                         f"over with --overwrite, or use another --out")
    if resume:
        if _checkpoint(out) or all(p.name == STATE for p in entries):
            return  # a checkpoint to continue, or a run killed before its first one (starts over)
        what = ("a finished run (summary.json): there is nothing to resume" if (out / "summary.json").is_file()
                else "no checkpoint to resume (OUT/.state/progress.json)")
        raise ValueError(f"--resume: --out {out} holds {what}; "
                         + ("rerun with --overwrite to replace it, or use another --out" if is_run
                            else "use another --out"))
    if overwrite:
        if not is_run:
            raise ValueError(f"--overwrite: --out {out} is not a specext run directory (it holds {names}); refusing "
                             f"to delete it: use another --out, or empty it yourself")
        import logging

        logging.getLogger(f"specext.{kind}").info("--overwrite: clearing %s (%d entries)", out, len(entries))
        _remove(entries)
        return
    if not is_run:
        raise ValueError(f"--out {out} is not empty and not a specext run directory (it holds {names}); a run "
                         f"directory holds one run only: use another --out")
    if _checkpoint(out):
        raise ValueError(f"--out {out} holds an unfinished run (a checkpoint in {out / STATE}): continue it with "
                         f"--resume, start it over with --overwrite, or use another --out")
    what = "a finished run" if (out / "summary.json").is_file() else "an earlier run's files"
    raise ValueError(f"--out {out} holds {what} ({names}); a run directory holds one run only: pass --overwrite "
                     f"to replace it, or use another --out")


class RunLock:
    """Exclusive lock on a run directory: ``fcntl.flock`` on ``OUT/.lock``, which holds the
    holder's process id. A second run on the same ``--out`` is refused with that id. The
    kernel drops the lock when its process dies, so a ``.lock`` left by a killed run (its pid
    still written) is taken over with a warning. Released (file emptied) on exit."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self.fd: Optional[int] = None
        self.created = False  # whether acquire() created the lock file (it did not exist before)

    def acquire(self) -> "RunLock":
        import fcntl

        self.created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{self.path.parent} is in use by another specext run (process id {holder}, "
                             f"lock {self.path}); wait for it to finish or use another --out") from None
        old = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if old:
            import logging

            logging.getLogger("specext.analyze").warning(
                "%s: stale lock of process %s (no longer running) taken over", self.path, old)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self, remove: bool = False) -> None:
        """Release the lock; ``remove``: also delete the lock file (a run refused before it
        wrote anything leaves nothing behind in a folder that was not a run directory)."""
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)  # a cleanly ended run leaves no pid behind
            if remove:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":  # ``with lock:`` releases what ``acquire()`` took (if anything)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------- state


def check_rows(rows: List[dict], questions: Sequence, first: int, path: Path, next_question: Optional[int] = None) -> None:
    """Every saved row is the probe's question at its index (``first`` + its position): same
    question text and concept, and as many rows as questions before ``next_question``.
    Otherwise the checkpoint holds another probe's (or another share's) rows: a clear error."""
    restart = "use another --out, or rerun with --overwrite instead of --resume (which starts the run over)"
    if next_question is not None and len(rows) != next_question - first:
        raise ValueError(f"--resume: {path} holds {len(rows)} rows but the checkpoint continues at question "
                         f"{next_question} (expected {next_question - first} rows from question {first}); {restart}")
    if len(rows) > len(questions):
        raise ValueError(f"--resume: {path} holds {len(rows)} rows, more than the {len(questions)} questions "
                         f"of this run; {restart}")
    for i, (r, q) in enumerate(zip(rows, questions)):
        if not isinstance(r, dict) or r.get("question") != q.question or r.get("concept") != q.concept:
            got = (r.get("concept"), r.get("question")) if isinstance(r, dict) else r
            raise ValueError(f"--resume: row {i + 1} of {path} does not belong to question {first + i} of the probe "
                             f"({q.source}: concept {q.concept!r}, {q.question!r}); it holds {got!r}: the checkpoint "
                             f"is of another probe or run; {restart}")


# Fingerprint option -> the command-line option that sets it (the rest: --NAME).
_OPTION_FLAGS = {"pss": "PSS (--no-pss)", "open_ended": "--no-open", "pss.ratios": "--ratios",
                 "pss.control_size": "--pss-control", "pss.concepts": "--pss-concepts",
                 "pss.random_control": "--no-random-control", "pss.seed": "--seed", "pss.bootstrap": "--bootstrap",
                 "pss.batch_rows": "--pss-batch-rows", "world_size": "torchrun --nproc_per_node"}


# What each hashed input of a fingerprint is, for the message when it changed.
_HASHED = {"model_config_sha256": "MODEL_DIR's config.json differs from the checkpoint's (another model, or an "
                                  "edited config)",
           "weights_sha256": "the bytes of MODEL_DIR's *.safetensors weights differ from the checkpoint's (another "
                             "model, or a fine-tune of it)",
           "probe_sha256": "the probe file's contents differ from the checkpoint's",
           "summary_sha256": "the --from-run run's summary.json differs from the checkpoint's",
           "mass_sha256": "the --from-run run's mass.safetensors differs from the checkpoint's"}


def fingerprint_changes(old: Dict[str, object], new: Dict[str, object]) -> List[str]:
    """What differs between a checkpoint's fingerprint (``old``) and this run's (``new``), one
    entry per option: ``--batch-size: 8 in the checkpoint, 4 now``; hashes are named only."""
    out: List[str] = []

    def flag(key: str) -> str:
        if key in _OPTION_FLAGS:
            return _OPTION_FLAGS[key]
        return "--" + key.replace("pss.", "pss-").replace("_", "-")

    def show(v, other) -> str:
        if isinstance(v, dict) or isinstance(other, dict):  # a block switched on or off (PSS)
            return "on" if isinstance(v, dict) else "off"
        return "none" if v is None else json.dumps(v)

    def walk(a, b, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in list(a) + [k for k in b if k not in a]:
                if a.get(k) != b.get(k):
                    walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            return
        if path.endswith("sha256"):
            what = _HASHED.get(path)
            out.append(f"{path}: {what}" if what else f"{path} (the file's contents changed)")
            return
        key = path[len("options."):] if path.startswith("options.") else path
        name = flag(key) if path.startswith("options.") or path == "world_size" else path
        out.append(f"{name}: {show(a, b)} in the checkpoint, {show(b, a)} now")

    walk(old, new, "")
    return list(dict.fromkeys(out))  # one option may set two keys (--seed: seed and pss.seed): named once


class RunState:
    """Checkpoint of a run in ``OUT/.state``: the accumulators (one file per checkpoint) and
    an append-only ``rows.jsonl``, published by an atomic rewrite of ``progress.json``
    (which names the accumulator file and how many rows are valid) after both are on disk.
    Rows past that count (a write cut short by a kill) are dropped on resume.

    Under torchrun each rank keeps its own share's checkpoint in ``OUT/.state/rank-R/``
    (``rank`` given): the same files, for the questions and PSS concepts that rank owns."""

    def __init__(self, out: Path, rank: Optional[int] = None):
        self.root = out / STATE
        self.dir = self.root if rank is None else self.root / f"rank-{rank}"
        self.progress = self.dir / "progress.json"
        self.rows_path = self.dir / "rows.jsonl"
        self.rows_written = 0

    def load(self, fingerprint: Dict[str, object], questions: Optional[Sequence] = None, first: int = 0):
        """The checkpoint: ``(next_question, accumulators, rows)``, or None without one.
        ``questions`` (this run's share of the probe, starting at probe index ``first``):
        every saved row must be the question at its index (question text and concept)."""
        if not self.progress.is_file():
            return None
        restart = "the checkpoint cannot be resumed: rerun with --overwrite instead of --resume (which starts the run over)"
        try:
            prog = json.loads(self.progress.read_text())
            n, acc_name, nxt = prog["rows"], prog["accumulators"], prog["next_question"]
            if not (isinstance(n, int) and isinstance(nxt, int) and isinstance(acc_name, str)):
                raise ValueError("fields of the wrong type")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"--resume: {self.progress} is damaged ({e}); {restart}") from None
        if prog.get("fingerprint") != fingerprint:
            fpo = prog.get("fingerprint") if isinstance(prog.get("fingerprint"), dict) else {}
            diff = [k for k in fingerprint if fpo.get(k) != fingerprint[k]]
            why = (": the model's weights differ from those the run was started with (same file layout, "
                   "other tensor bytes, e.g. a fine-tune of the same base)") if "weights_sha256" in diff else ""
            changed = fingerprint_changes(fpo, fingerprint)
            raise ValueError(f"--resume: the run in {self.dir.parent} was started with different inputs "
                             f"({', '.join(diff)} differ){why}"
                             + (f"; changed: {'; '.join(changed)}" if changed else "")
                             + "; use another --out, resume with the checkpoint's values, or start over with "
                               "--overwrite instead of --resume")
        acc_path = self.dir / acc_name
        try:
            acc = read_safetensors(acc_path)
        except Exception as e:  # safetensors raises its own error types for a truncated file
            raise ValueError(f"--resume: the accumulator file {acc_path} is damaged or missing "
                             f"({type(e).__name__}: {e}); {restart}") from None
        try:
            with open(self.rows_path, "rb") as f:
                lines = f.read().split(b"\n")[:n]
        except OSError as e:
            raise ValueError(f"--resume: cannot read {self.rows_path} ({e.strerror or e}); {restart}") from None
        if len(lines) != n or (n and not lines[-1]):
            have = len([l for l in lines if l])
            raise ValueError(f"--resume: {self.rows_path} is damaged: it holds {have} rows, {self.progress} "
                             f"says {n}; {restart}")
        try:
            rows = [json.loads(l) for l in lines]
        except ValueError as e:
            raise ValueError(f"--resume: {self.rows_path} is damaged ({e}); {restart}") from None
        if questions is not None:
            check_rows(rows, questions, first, self.rows_path, nxt)
        write_bytes(self.rows_path, b"".join(l + b"\n" for l in lines))  # drop a torn tail
        self.rows_written = n
        return nxt, acc, rows

    def save(self, k: int, next_question: int, fingerprint, accum: Dict[str, torch.Tensor], rows: List[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.rows_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows[self.rows_written:]))
            f.flush()
            os.fsync(f.fileno())
        self.rows_written = len(rows)
        acc_name = f"accum-{k:06d}.safetensors"
        write_safetensors(self.dir / acc_name, accum)
        write_json(self.progress, {"next_question": next_question, "chunk": k, "accumulators": acc_name,
                                         "rows": len(rows), "fingerprint": fingerprint})
        for p in self.dir.iterdir():  # older accumulators are no longer referenced
            if p.name.startswith("accum-") and p.name != acc_name:
                p.unlink(missing_ok=True)

    def load_pss(self) -> Dict[str, List[dict]]:
        p = self.dir / "pss.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def save_pss(self, done: Dict[str, List[dict]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "pss.json", done)

    def layout_problem(self, world: Optional[int]) -> Optional[str]:
        """Why ``--resume`` with ``world`` ranks (None: one process, no torchrun) cannot continue
        the checkpoint in ``.state``, or None. One process keeps ``.state/progress.json``; N
        torchrun ranks keep ``.state/rank-R/`` each, and a rank's share depends on N: a
        checkpoint of the other layout, or of another rank count, is refused here, before any
        rank scores or saves (otherwise the ranks without a checkpoint of their own would start
        over and overwrite what is there)."""
        root = self.root
        if not root.is_dir():
            return None
        where = f"--resume: the checkpoint in {root.parent}"
        restart = "or start over with --overwrite instead of --resume"
        ranks = sorted((p for p in root.glob("rank-*") if p.is_dir() and (p / "progress.json").is_file()),
                       key=lambda p: p.name)

        def recorded(p: Path) -> Optional[int]:
            try:
                w = json.loads((p / "progress.json").read_text()).get("fingerprint", {}).get("world_size")
            except (OSError, ValueError, AttributeError):
                return None
            return w if isinstance(w, int) else None

        worlds = sorted({w for w in map(recorded, ranks) if w is not None})
        n = worlds[0] if len(worlds) == 1 else (len(ranks) if not worlds else None)
        ran_with = (f"{n} torchrun ranks" if n else f"torchrun ranks of different counts ({worlds})") \
            + f" ({', '.join(p.name for p in ranks[:4])}{' ...' if len(ranks) > 4 else ''})"
        if world is None:
            if ranks:
                return (f"{where} was written by {ran_with}; resume it with torchrun --nproc_per_node "
                        f"{n or '(its rank count)'}, {restart}")
            return None
        if (root / "progress.json").is_file():
            return f"{where} was written by one process (no torchrun); resume it without torchrun, {restart}"
        def index(p: Path) -> int:
            try:
                return int(p.name.split("-", 1)[1])
            except ValueError:
                return -1
        beyond = [p.name for p in ranks if index(p) >= world]
        if (worlds and worlds != [world]) or beyond:
            return (f"{where} was written by {ran_with}, this run has {world}: resume it with torchrun "
                    f"--nproc_per_node {n or '(its rank count)'}, {restart}")
        return None

    def clear(self) -> None:
        """Remove this checkpoint (a rank's own folder; ``.state`` itself once it is empty)."""
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir != self.root:
            try:
                self.root.rmdir()  # the last rank to finish removes it
            except OSError:
                pass


PSS_COLUMNS = ["concept", "category", "tier", "ratio", "n_vectors", "cs", "g", "pss", "pss_delta", "pss_delta_signed",
               "pss_floor", "random_cs", "random_g", "random_pss", "random_pss_delta", "random_pss_delta_signed",
               "cs_before", "g_before", "denominator", "pss_general", "pss_overall"]


# A cell a spreadsheet would run as a formula (CSV injection, OWASP): it starts with one of
# these. Such a string cell gets a leading single quote; numbers, and strings that are a
# plain number ("-0.125000", "-inf"), are written as they are.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v):
    """One CSV cell, neutralised against formula injection the way OWASP recommends: a
    string starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return gets a leading
    ``'`` unless it is a plain number (so negative numbers, formatted or not, are kept)."""
    if isinstance(v, str) and v.startswith(FORMULA_START):
        if v == v.strip():
            try:
                float(v)
                return v
            except ValueError:
                pass
        return "'" + v
    return v


def csv_text(header: Iterable, rows: Iterable[Iterable]) -> str:
    """A CSV document (header, then rows) with every cell through :func:`csv_cell`: the one
    writer of every CSV specext writes (pss.csv, pss_curve.csv, concepts.csv, compare.csv,
    bench results)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    for r in [header, *rows]:
        w.writerow([csv_cell(v) for v in r])
    return buf.getvalue()


def pss_csv(rows) -> str:
    return csv_text(PSS_COLUMNS, (["" if r.get(c) is None else (f"{r[c]:.6f}" if isinstance(r[c], float) else r[c])
                                   for c in PSS_COLUMNS] for r in rows))


def pss_curve_csv(p: Dict[str, object]) -> str:
    """The aggregates of pss.csv: mean over concepts with its 95% bootstrap interval, per
    score (paper, delta, delta_signed), vectors (top, random) and ratio; the ``peak`` and the paper
    score's ``floor`` (ratio 0) as rows of their own."""
    rows = []
    fmt = lambda v: "" if v is None or v != v else f"{v:.6f}"  # noqa: E731
    ci = lambda c, i: "" if c is None else fmt(c[i])  # noqa: E731
    rows.append(["paper", "none", 0, fmt(p["floor"]), ci(p["floor_ci"], 0), ci(p["floor_ci"], 1), 0])
    from specext.metrics.pss import REPORTED_SCORES

    for sc in [k for k in REPORTED_SCORES if isinstance(p.get(k), dict)]:
        b = p[sc]
        head = int(sc == p["score"])
        for kind, pre in (("top", ""), ("random", "random_")):
            curve, cis = b[pre + "curve"], b[pre + "curve_ci"]
            if curve is None:
                continue
            for r, v, c in zip(p["ratios"], curve, cis):
                rows.append([sc, kind, f"{r:g}", fmt(v), ci(c, 0), ci(c, 1), head])
            pk, pc = b[pre + "peak"], b[pre + "peak_ci"]
            rows.append([sc, kind, "peak", fmt(pk), ci(pc, 0), ci(pc, 1), head])
    return csv_text(["score", "vectors", "ratio", "mean", "ci_low", "ci_high", "headline"], rows)


def concepts_csv(probe: ProbeSet, acc) -> str:
    by = acc["by_concept"]
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    rows = []
    for c, k, t in zip(probe.concepts, probe.concept_category, probe.concept_tier):
        a = by.get(c, {})
        rows.append([c, probe.categories[k], t or "", a.get("questions", 0), fmt(a.get("mcq")),
                     fmt(a.get("mcq_norm")), fmt(a.get("open"))])
    return csv_text(["concept", "category", "tier", "questions", "mcq", "mcq_norm", "open"], rows)
