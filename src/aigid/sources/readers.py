"""Readers for the dataset layouts users bring, each returning rows in the CT2/Defactify layout.

- ``competition``: the layout the CT2 competition distributed. Per split directory (``train/``,
  ``validation/``, ``test/``, ``unlabeled/``, or the root itself for a single split): a captions table
  (``captions.xlsx`` or ``captions.csv``, columns ``Index``, ``Caption``) and either one folder per source,
  named ``<source>_image`` (``coco_image``, ``sd21_image``, ...: every one must map to a class through
  ``prepare.class_aliases`` or ``prepare.class_names``) holding ``image_{Index}.jpg`` (labels come from the
  folder), or a labels table (``labels.xlsx`` /
  ``labels.csv``: ``Index``, ``Label_A``, ``Label_B``) with the images ``image_{Index}.jpg`` in ``images/``
  or next to the tables.
- ``folders``: one folder per class, ``<root>/<class>/*`` (or ``<root>/<split>/<class>/*``), with an optional
  ``<root>/captions.csv`` (columns ``file``, ``caption``; ``file`` relative to the root or a bare file name).
  Images without a caption get an empty caption. Folder names map to classes through
  ``prepare.class_names`` and ``prepare.class_aliases``. Every entry of a class folder is a sample (one that is
  no image file is a bad row); OS and archiver junk (:data:`JUNK`) and files beside the class folders are
  counted as ``ignored``.

Rows carry ``{"bytes": None, "path": <file>}``; the checks of the prepare stage read and validate each file.
:func:`load_source` also reads the other sources: the hub (at a pinned revision), arrow and parquet (also as
a dataset downloaded from the hub: one folder per config).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from datasets import Dataset, DatasetDict

from aigid.core.data import RAW_COLUMNS, DataError, image_suffixes, open_dataset, schema
from aigid.core.errors import choice
from aigid.sources.tables import FIRST_ROW, duplicates, integers, read_table

SPLITS = ("train", "validation", "test", "unlabeled")
SOURCE_SUFFIX = "_image"  # competition source folders: coco_image, sd21_image, ...


@dataclass
class Rejected:
    """A row left out by prepare (``on_bad: skip``): its split, row (-1: a table row, named in ``reason``),
    file and reason; listed in the quarantine report."""

    split: str
    row: int
    file: str
    reason: str


@dataclass
class Reader:
    """What the readers need besides the files: the classes, and where skipped table rows go."""

    class_names: tuple[str, ...]
    aliases: dict[str, str]
    on_bad: str = "error"
    rejected: list[Rejected] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)  # entries that are never samples, by reason (JUNK)

    def bad_keys(self, messages: dict, split: str, path: Path) -> set:
        """Duplicated keys of a table: an error, or with on_bad: skip every row holding them quarantined."""
        if messages and self.on_bad != "skip":
            raise DataError(next(iter(messages.values())))
        for message in messages.values():
            self.rejected.append(Rejected(split, -1, str(path), message))
        return set(messages)


def load_source(params, raw: Path | None = None, rejected: list[Rejected] | None = None) -> tuple[DatasetDict, dict]:
    """Read ``params.source`` (the prepare params) in ``params.layout`` (``hub``, a name in :data:`LAYOUTS`, or
    ``auto``: told from the files) and say where it came from: ``{"source", "layout"}`` plus, for the hub, the
    ``revision`` asked for and the commit it resolved to. A local source must lie inside ``raw`` (the
    DVC-tracked raw data folder), when given. Table rows skipped under ``on_bad: skip`` go to ``rejected``."""
    source, layout = params.source, params.layout
    choice(dict.fromkeys(("auto", "hub", *LAYOUTS)), layout, "prepare.layout")
    path = Path(source)
    if layout == "auto":
        if path.is_dir():
            layout = detect_layout(path)
        elif path.suffix or source.startswith((".", "/")) or (raw is not None and path.is_relative_to(raw)):
            raise DataError(f"prepare.source={source}: no such directory")
        else:
            layout = "hub"
    origin = {"source": source, "layout": layout}
    if layout == "hub":
        dsd, resolved = _from_hub(source, params.revision)
        return dsd, {**origin, "revision": params.revision, "resolved_revision": resolved}
    if not path.is_dir():
        raise DataError(f"prepare.source={source}: no such directory (prepare.layout={layout})")
    if raw is not None and not path.resolve().is_relative_to(raw.resolve()):
        raise DataError(
            f"prepare.source={source}: a local dataset must be inside {raw}/, where DVC sees its files "
            f"change; move it there and track it with `dvc add {raw}/<name>` (README: Bringing your "
            f"own data)"
        )
    reader = Reader(
        tuple(params.class_names), dict(params.class_aliases), params.on_bad, rejected if rejected is not None else []
    )
    dsd = LAYOUTS[layout].read(path, reader)
    return dsd, {**origin, "ignored": dict(sorted(reader.ignored.items()))}


def read_parquet(root: Path) -> DatasetDict:
    """``<split>.parquet``, ``<split>-*.parquet`` or ``<split>/*.parquet`` files as splits, in ``root`` or in its
    config folder (:func:`_config_folder`); the shards of a split are read in name order. A file whose split
    cannot be told, a file without rows, and files whose columns differ are errors naming the files."""
    import pyarrow.parquet as pq
    from datasets import load_dataset

    files: dict[str, list[str]] = {}
    columns: dict[Path, list[str]] = {}
    base = _config_folder(root)
    for file in sorted(base.rglob("*.parquet")):
        rel = file.relative_to(base)
        split = rel.parts[0] if len(rel.parts) > 1 else file.stem.split("-")[0]
        if split not in SPLITS:
            raise DataError(
                f"{file}: cannot tell which split it holds (name it <split>.parquet or "
                f"<split>-*.parquet, or put it in a <split>/ folder; splits: {', '.join(SPLITS)})"
            )
        try:
            meta = pq.read_metadata(file)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError...: not a parquet file
            raise DataError(f"{file}: not a readable parquet file ({err})") from None
        if meta.num_rows == 0:
            raise DataError(f"{file}: no rows (remove the file, or write the split's rows into it)")
        columns[file] = meta.schema.to_arrow_schema().names
        files.setdefault(split, []).append(str(file))
    if len({tuple(sorted(c)) for c in columns.values()}) > 1:
        listed = "; ".join(f"{f.relative_to(root)}: {', '.join(c)}" for f, c in columns.items())
        raise DataError(
            f"{root}: the parquet files have different columns ({listed}); every file needs the same "
            f"columns ({', '.join(RAW_COLUMNS)})"
        )
    return load_dataset("parquet", data_files=files)


def _config_folder(root: Path) -> Path:
    """Where the parquet files of a dataset are: ``root``, or the Hub's layout, one folder per config
    (``data/`` for the default one) of ``<split>-NNNNN-of-NNNNN.parquet``. Of several config folders, the one
    README.md's ``configs:`` header makes the default is read; without one, choosing is up to the user."""
    tops = {f.relative_to(root).parts[0] for f in root.rglob("*.parquet")}
    configs = sorted(t for t in tops if t not in SPLITS and (root / t).is_dir())
    if not configs or len(configs) < len(tops):  # no config folders, or also other files: split by name
        return root
    default = configs[0] if len(configs) == 1 else _default_config(root)
    if default not in configs:
        raise DataError(
            f"{root}: parquet files of {len(configs)} configs ({', '.join(c + '/' for c in configs)}) and no "
            f"default one in README.md's configs: header; choose one with prepare.source={root / configs[0]}"
        )
    return root / default


def _default_config(root: Path) -> str | None:
    """The folder of the default config in ``root/README.md``'s YAML header, by the Hub's rule (the config
    marked ``default: true``, the one named ``default``, or the only one); None without one."""
    from datasets.data_files import sanitize_patterns
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub.repocard import metadata_load
    from yaml import YAMLError

    card = root / "README.md"
    if not card.is_file():
        return None
    try:
        configs = MetadataConfigs.from_dataset_card_data(metadata_load(card) or {})
        name = configs.get_default_config_name()
        patterns = sanitize_patterns(configs[name].get("data_files", [])) if name else {}
    except (ValueError, YAMLError):  # a malformed header, or several defaults: none is chosen
        return None
    folders = {PurePosixPath(p).parts[0] for split in patterns.values() for p in split}
    return folders.pop() if len(folders) == 1 else None


def _from_hub(source: str, revision: str) -> tuple[DatasetDict, str | None]:
    from datasets import load_dataset_builder

    try:
        builder = load_dataset_builder(source, revision=revision)
        builder.download_and_prepare()
        dsd = builder.as_dataset()
    except Exception as err:  # the hub client raises many types; all mean "not reachable from here"
        raise DataError(
            f"prepare.source={source}: could not load revision {revision!r} from the Hugging Face hub "
            f"or its local cache ({type(err).__name__}: {err})"
        ) from err
    return dsd, resolved_revision(builder.config.data_files)


def resolved_revision(data_files) -> str | None:
    """The commit a hub dataset's files were read at: `datasets` names them hf://datasets/<id>@<commit>/..."""
    found = re.search(r"@([0-9a-f]{40})/", str(data_files))
    return found.group(1) if found else None


def inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, refusing anything that resolves outside ``root`` (``../``, absolute paths, links)."""
    try:
        path = (root / relative).resolve()
    except RuntimeError:  # a symbolic link loop: nothing can be read through it, and prepare says so
        return root / relative
    if not path.is_relative_to(root.resolve()):
        raise DataError(f"{what}: {relative!r} points outside the dataset root {root}")
    return path


def class_index(name: str, class_names: tuple[str, ...], aliases: dict[str, str], where: str) -> int:
    name = aliases.get(name, name)
    if name not in class_names:
        raise DataError(
            f"{where}: class folder {name!r} is not a known class ({', '.join(class_names)}); "
            f"add it to prepare.class_names or prepare.class_aliases"
        )
    return class_names.index(name)


def _table(directory: Path, stem: str, columns: tuple[str, ...], required: bool = True) -> tuple | None:
    """(frame, path) of ``<stem>.xlsx`` or ``<stem>.csv`` in ``directory``."""
    for suffix in (".xlsx", ".csv"):
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return read_table(path, columns), path
    if required:
        raise DataError(f"{directory}: no {stem}.xlsx or {stem}.csv")
    return None


def _rows(captions, paths, labels_a, labels_b) -> Dataset:
    return Dataset.from_dict(
        {
            "Caption": list(captions),
            "Image": [{"bytes": None, "path": str(p)} for p in paths],
            "Label_A": list(labels_a),
            "Label_B": list(labels_b),
        },
        features=schema(columns=RAW_COLUMNS),
    )


def source_dirs(directory: Path, class_names, aliases) -> list[tuple[int, Path]]:
    """The competition source folders (``*_image``) of a split directory with their class, in class order;
    a folder that maps to no class is an error, never skipped."""
    found = [d for d in directory.iterdir() if d.is_dir() and d.name.endswith(SOURCE_SUFFIX)]
    return sorted(
        ((class_index(d.name, class_names, aliases, str(d)), d) for d in found), key=lambda kd: (kd[0], kd[1].name)
    )


def _competition_split(directory: Path, split: str, reader: Reader) -> Dataset:
    frame, path = _table(directory, "captions", ("Index", "Caption"))
    index = integers(frame, "Index", path)
    bad = reader.bad_keys(duplicates(index, path, "Index"), split, path)
    text = {i: c for i, c in zip(index, frame["Caption"]) if i not in bad}
    sources = source_dirs(directory, reader.class_names, reader.aliases)
    rows: tuple[list, list, list, list] = ([], [], [], [])
    if sources:
        for label_b, source in sources:
            for i, caption in text.items():
                for part, value in zip(rows, (caption, source / f"image_{i}.jpg", int(label_b != 0), label_b)):
                    part.append(value)
        return _rows(*rows)
    found = _table(directory, "labels", ("Index", "Label_A", "Label_B"), required=False)
    if found is None:
        raise DataError(f"{directory}: neither source folders (*{SOURCE_SUFFIX}) nor a labels table")
    labels, path = found
    images = directory / "images" if (directory / "images").is_dir() else directory
    index = integers(labels, "Index", path)
    label_a = integers(labels, "Label_A", path, range(2))
    label_b = integers(labels, "Label_B", path, range(len(reader.class_names)))
    bad = reader.bad_keys(duplicates(index, path, "Index"), split, path)
    for row, (i, a, b) in enumerate(zip(index, label_a, label_b)):
        if i in bad:
            continue
        if i not in text:
            raise DataError(f"{path} row {row + FIRST_ROW}: Index={i} has no caption in the captions table")
        for part, value in zip(rows, (text[i], images / f"image_{i}.jpg", a, b)):
            part.append(value)
    return _rows(*rows)


def read_competition(root: Path, reader: Reader) -> DatasetDict:
    splits = {s: root / s for s in SPLITS if (root / s).is_dir()} or {"train": root}
    return DatasetDict({s: _competition_split(d, s, reader) for s, d in splits.items()})


# Entries of a class-folder dataset that are never samples (what operating systems and archivers leave), by
# lower-case name -> the name counted under `ignored` in reports/prepare.json; any other name starting with "."
# is counted as "hidden". A folder counts once; its contents are not read.
JUNK = {n.lower(): n for n in ("__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini")}
NOT_IN_A_CLASS_FOLDER = "not in a class folder"


def _listing(folder: Path, ignored: Counter) -> list[Path]:
    """The entries of ``folder`` in name order, less the junk, which is counted in ``ignored``."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise DataError(f"{folder}: cannot list the folder ({err.strerror or err})") from None
    kept = []
    for entry in entries:
        junk = JUNK.get(entry.name.lower()) or ("hidden" if entry.name.startswith(".") else None)
        if junk:
            ignored[junk] += 1
        else:
            kept.append(entry)
    return kept


def _samples(folder: Path, ignored: Counter) -> list[Path]:
    """Every entry of a class folder that is a sample, depth first in name order: files and links (a broken
    one too, and a folder named like an image: prepare reports why it cannot be read); other folders are
    walked."""
    found = []
    for entry in _listing(folder, ignored):
        if entry.is_dir() and not entry.is_symlink() and entry.suffix.lower() not in image_suffixes():
            found += _samples(entry, ignored)
        else:
            found.append(entry)
    return found


def _loose(file: Path, root: Path, ignored: Counter) -> None:
    """A file beside the class (or split) folders is no sample: counted, unless it is the root's captions.csv."""
    if file != root / "captions.csv":
        ignored[NOT_IN_A_CLASS_FOLDER] += 1


def _folder_split(root: Path, split_dir: Path, captions: dict[str, str], reader: Reader) -> Dataset:
    rows: tuple[list, list, list, list] = ([], [], [], [])
    for class_dir in _listing(split_dir, reader.ignored):
        if not class_dir.is_dir():
            _loose(class_dir, root, reader.ignored)
            continue
        label_b = class_index(class_dir.name, reader.class_names, reader.aliases, str(class_dir))
        for file in _samples(class_dir, reader.ignored):
            inside(root, str(file.relative_to(root)), str(class_dir))  # a symlink out of the root is refused
            rel = file.relative_to(root).as_posix()
            caption = captions.get(rel, captions.get(file.name, ""))
            for part, value in zip(rows, (caption, file, int(label_b != 0), label_b)):
                part.append(value)
    if not rows[0]:
        raise DataError(f"{split_dir}: no images in any class folder")
    return _rows(*rows)


def _split_dirs(root: Path, ignored: Counter) -> dict[str, Path]:
    """The split folders of ``root``, or ``{"train": root}`` without any. Beside split folders, another folder
    is an error (a misnamed split is never left out) and a file is counted in ``ignored``."""
    if not any((root / s).is_dir() for s in SPLITS):
        return {"train": root}
    for entry in _listing(root, ignored):
        if entry.is_dir() and entry.name not in SPLITS:
            raise DataError(f"{entry}: not a split folder ({', '.join(SPLITS)}); rename it or move it out of {root}")
        if not entry.is_dir():
            _loose(entry, root, ignored)
    return {s: root / s for s in SPLITS if (root / s).is_dir()}


def read_folders(root: Path, reader: Reader) -> DatasetDict:
    captions: dict[str, str] = {}
    table = root / "captions.csv"
    if table.is_file():
        frame = read_table(table, ("file", "caption"))
        bad = reader.bad_keys(duplicates(list(frame["file"]), table, "file"), "all", table)
        for row, (file, caption) in enumerate(zip(frame["file"], frame["caption"])):
            inside(root, file, f"{table} row {row + FIRST_ROW}")
            if file not in bad:
                captions[file] = caption
    splits = _split_dirs(root, reader.ignored)
    return DatasetDict({s: _folder_split(root, d, captions, reader) for s, d in splits.items()})


def _is_competition(root: Path) -> bool:
    for d in (root, *(root / s for s in SPLITS)):
        if any((d / f"captions{x}").is_file() for x in (".xlsx", ".csv")) and (
            any(p.is_dir() and p.name.endswith(SOURCE_SUFFIX) for p in d.iterdir())
            or any((d / f"labels{x}").is_file() for x in (".xlsx", ".csv"))
        ):
            return True
    return False


@dataclass(frozen=True)
class Layout:
    """A way a local dataset is laid out: ``found(root)`` tells it from the files (``auto`` asks the layouts in
    :data:`LAYOUTS`' order, so a more specific one comes first), ``read(root, reader)`` returns its splits."""

    found: Callable[[Path], bool]
    read: Callable[[Path, Reader], DatasetDict]


# prepare.layout's choices besides auto and hub; a new layout is one entry here (and its test).
LAYOUTS = {
    # a DatasetDict saved by `datasets` (never written to: no cache files in the user's dataset)
    "arrow": Layout(lambda root: (root / "dataset_dict.json").is_file(), lambda root, _: open_dataset(root)),
    "parquet": Layout(
        lambda root: any(root.glob("*.parquet")) or any(root.glob("*/*.parquet")), lambda root, _: read_parquet(root)
    ),
    "competition": Layout(_is_competition, read_competition),
    "folders": Layout(lambda root: True, read_folders),  # whatever is left: one folder per class
}


def detect_layout(root: Path) -> str:
    return next(name for name, layout in LAYOUTS.items() if layout.found(root))
