"""Write files and folders so a crash never leaves a half-written result behind.

Everything is written under a hidden temporary name in the destination's own folder, flushed
to disk (``fsync``), renamed into place, and the folder itself is flushed so the rename
survives a power cut. A process killed at any moment (SIGKILL, a crash, a full disk) leaves the
previous version visible, or nothing, plus a hidden staging entry that the next training run in
that folder removes (``remove_stale_staging``). Staging names carry the writer's process id:

    .NAME.tmp-PID-XXXXXXXX    a file or folder being written (atomic_file, atomic_directory)
    .NAME.old-PID             the previous NAME, set aside while a folder is replaced
    .NAME.del-PID             a folder being deleted (remove_tree)
    .staging-PID-XXXXXXXX     files on their way into a folder (files_into)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deltatune.errors import DeltatuneError

# deltatune's own staging names (see the module docstring); the pid is absent in names from
# before it was added. tempfile's random part is 8 of [a-z0-9_].
STAGING_NAME = re.compile(
    r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)(?:-[a-z0-9_]{8})?"
    r"|\.(?P<legacy>.+)\.tmp-[a-z0-9_]{8}"
    r"|\.staging-(?:(?P<staging_pid>\d+)-)?[a-z0-9_]{8}"
)


def _usual_mode(path: Path, directory: bool) -> None:
    """Give a temporary file or folder (created private, 0600/0700) the mode a plain ``open`` or
    ``mkdir`` would have given it under the user's umask, before it takes its final name."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (the names renamed into it), to the disk."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():  # a system that opens no folder (Windows): its renames need no flush
            return
        raise
    try:
        os.fsync(descriptor)
    except OSError:
        if not path.is_dir():  # some file systems cannot flush a folder; a file must be flushed
            raise
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path, usual_modes: bool = False) -> None:
    """``fsync_path`` every file under ``folder``, then every folder, innermost first; with
    ``usual_modes``, each also gets the mode a plain ``open`` or ``mkdir`` gives (some writers,
    safetensors among them, create files private)."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            if usual_modes:
                _usual_mode(Path(root) / name, directory=False)
            fsync_path(Path(root) / name)
        if usual_modes:
            _usual_mode(Path(root), directory=True)
        fsync_path(Path(root))


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    Files already in ``target`` that the block does not write are dropped: the folder is
    the block's output and nothing else. On an exception the temporary folder is removed
    and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        fsync_tree(staging, usual_modes=True)
        if target.exists():  # killed between these renames: the next run puts .old back (remove_stale_staging)
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            fsync_path(target.parent)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
            fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is flushed and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _usual_mode(Path(tmp), directory=False)
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


def remove_tree(folder: Path) -> None:
    """Delete ``folder`` so that it vanishes at once: renamed to a hidden name first, then removed
    (a process killed meanwhile leaves only the hidden name, which the next run clears)."""
    doomed = folder.with_name(f".{folder.name}.del-{os.getpid()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(folder: str | os.PathLike) -> list[str]:
    """Clear the hidden staging entries that a killed deltatune process left in ``folder``; return
    their names. Only deltatune's own staging names (``STAGING_NAME``) of processes that are no
    longer running are touched; a folder set aside while it was being replaced (``.NAME.old-PID``)
    goes back to its name when nothing took that name, since it is the last complete version."""
    folder = Path(folder)
    cleared = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        match = STAGING_NAME.fullmatch(path.name)
        if match is None:
            continue
        pid = match["pid"] or match["staging_pid"]
        if pid is not None and _alive(int(pid)):
            continue
        original = folder / match["name"] if match["name"] else None
        if match["kind"] == "old" and original is not None and not original.exists():
            os.replace(path, original)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        cleared.append(path.name)
    if cleared:
        fsync_path(folder)
    return cleared


# Names deltatune writes into an output folder; only these may be replaced or removed there.
COMPOSITION_NAME = "deltatune_composition.json"  # which adapter subfolders run together
ADAPTER_NAME = r"[A-Za-z0-9_-]+"  # an adapter's name, also its subfolder's: never a path
OWN_FILES = frozenset({
    "adapter_config.json", "adapter_model.safetensors", "adapter_training_state.safetensors",
    "deltatune_method.json", "deltatune_run.yaml", "metrics.jsonl", "config.json", "generation_config.json",
    "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", "labels.json",
    COMPOSITION_NAME,
})


def is_own_file(path: Path) -> bool:
    """A file or folder deltatune writes into an output folder (checkpoints, model shards included)."""
    name = path.name
    return (name in OWN_FILES or name.startswith("checkpoint-")
            or (name.startswith("model-") and name.endswith(".safetensors")))


def check_output_folder(output: str | os.PathLike, *, overwrite: bool, reads: tuple[str | os.PathLike, ...] = (),
                        flag: str = "--overwrite") -> Path:
    """Refuse an output that would lose someone's data: a file, a folder the command reads from,
    or a folder that already holds files unless ``overwrite`` (which still replaces only
    deltatune's own files: everything else in the folder is kept)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DeltatuneError(f"--output {str(output)!r} is a file; name a folder to write into.")
    for source in reads:
        if Path(source).exists() and output.resolve() == Path(source).resolve():
            raise DeltatuneError(f"--output {str(output)!r} is the folder this command reads; write to another folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise DeltatuneError(f"--output {str(output)!r} already holds files; choose a new folder, or pass {flag} to "
                             "replace deltatune's files in it (other files are kept).")
    return output


def remove_own_files(folder: Path) -> None:
    """Clear what an earlier deltatune run wrote into ``folder``: its own files, and the adapter
    subfolders its composition manifest names. Nothing else is touched."""
    parts = composition_parts(folder)
    for path in folder.iterdir() if folder.is_dir() else ():
        if is_own_file(path) or path in parts:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def composition_parts(folder: Path) -> list[Path]:
    """The subfolders an earlier composition saved here (``deltatune_composition.json`` names them),
    each only if it is a peft adapter folder; none if there is no readable manifest."""
    try:
        names = json.loads((folder / COMPOSITION_NAME).read_text(encoding="utf-8")).get("adapters")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(names, list):
        return []
    return [folder / name for name in names
            if isinstance(name, str) and re.fullmatch(ADAPTER_NAME, name)
            and (folder / name / "adapter_config.json").is_file()]


@contextmanager
def files_into(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder inside ``folder``; on success each file written there lands in
    ``folder`` by a rename (replacing a file of the same name, keeping every other)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=folder))
    try:
        yield staging
        fsync_tree(staging)
        for written in sorted(staging.iterdir()):
            target = folder / written.name
            if target.is_dir() and written.is_dir():
                shutil.rmtree(target)
            os.replace(written, target)
        fsync_path(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
