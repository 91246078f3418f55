"""Write files and folders so a crash never leaves a half-written result behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deltatune.errors import DeltatuneError


def _usual_mode(path: Path, directory: bool) -> None:
    """Give a temporary file or folder (created private, 0600/0700) the mode a plain ``open`` or
    ``mkdir`` would have given it under the user's umask, before it takes its final name."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    Files already in ``target`` that the block does not write are dropped: the folder is
    the block's output and nothing else. On an exception the temporary folder is removed
    and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _usual_mode(staging, directory=True)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _usual_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


# Names deltatune writes into an output folder; only these may be replaced or removed there.
OWN_FILES = frozenset({
    "adapter_config.json", "adapter_model.safetensors", "adapter_training_state.safetensors",
    "deltatune_method.json", "deltatune_run.yaml", "metrics.jsonl", "config.json", "generation_config.json",
    "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "added_tokens.json", "labels.json",
    "deltatune_composition.json",
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
    """Clear what an earlier deltatune run wrote into ``folder``; nothing else is touched."""
    for path in folder.iterdir() if folder.is_dir() else ():
        if is_own_file(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextmanager
def files_into(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging folder inside ``folder``; on success each file written there lands in
    ``folder`` by a rename (replacing a file of the same name, keeping every other)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        yield staging
        for written in sorted(staging.iterdir()):
            target = folder / written.name
            if target.is_dir() and written.is_dir():
                shutil.rmtree(target)
            os.replace(written, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
