"""Score a table of images on Apache Spark with a registered model: `aigid score-table`.

The registered model (:mod:`aigid.serving.pyfunc`) scores the rows through MLflow's own
``mlflow.pyfunc.spark_udf``: Spark splits the rows into tasks, and each task loads the model where it runs and
scores its rows in Arrow batches. This module reads the input (image files are read on the executors, never
collected on the driver), calls the UDF and writes the result; Spark schedules the work, so the same command runs
on one machine (``--master local[2]``) or on a cluster (``spark://...``, ``yarn``, ``k8s://...``). pyspark is an
optional extra (``pip install 'aigid[spark]'``), imported only when the command runs.

The output is a Parquet table with ``path`` (when the input has it) and the columns of `aigid detect`, one row per
input row, in the input's order. A row that cannot be scored (a null cell, a file that cannot be read or is no
regular file, bytes that do not decode) carries its ``error`` and null scores; it never fails the job. What fails
the whole input is found before Spark starts, where the input is on this machine: a column of a type the model
cannot read (from the Parquet footers), no rows, an ``--out`` that exists or cannot be written. A local ``--out``
is written beside itself and renamed into place when the job has finished, so that a failed job leaves none.

Exit status as `aigid detect`'s: 0 every row was scored; 1 nothing was scored (a bad --model, --out or input, no
image found, no row readable: the rows with their errors are still written); 2 a command-line usage error; 3 some
rows could not be read (their rows say why).
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import click

from aigid.core import data
from aigid.core.data import DataError
from aigid.core.files import atomic_path
from aigid.core.stage import clean_errors
from aigid.tools.detect import SOME_FAILED, expand
from aigid.tools.models import registry_store

DEFAULT_MODEL = "models:/aigid-detector@candidate"
ROW, SCORES = "_row", "_scores"  # working columns: the input's order, the model's struct of outputs
# The model names a row that does not decode by its place in the Arrow batch it came in, which means nothing here.
BATCH_ROW = r"^row \d+: "
NO_TYPE = "void"  # Spark's name of a column whose every cell is null
# The columns a table may have, the types (as Spark names them) each may be, and what each holds. Any of them may
# also be of no type (every cell null, as pandas writes a column of None): each of its cells is then a null cell.
COLUMNS = {
    "path": (("string",), "image files, read where the executors run"),
    "image": (("binary", "string"), "the encoded image file, as bytes or base64 text"),
    "caption": (("string",), "the image's caption"),
}


@dataclass(frozen=True)
class Job:
    """What to score and where: ``source`` (a Parquet table, or a folder of images listed in ``images``), the
    output table ``out``, the registered model, the caption of rows without one, and the least number of tasks
    (None: Spark's default parallelism)."""

    source: str
    out: str
    model: str = DEFAULT_MODEL
    caption: str = ""
    partitions: int | None = None
    images: tuple[Path, ...] | None = None


def list_images(source: str) -> tuple[Path, ...] | None:
    """The image files of ``source`` when it is a local folder of images (searched recursively, as `aigid detect`
    does); None when it is a Parquet table: a file, a folder holding .parquet files, or a URI Spark reads."""
    path = Path(source)
    if not path.is_dir() or any(path.rglob("*.parquet")):
        return None
    images = expand([source])
    if not images:
        raise DataError(
            f"{source}: no image files and no .parquet files (image files: the formats Pillow opens, .jpg, .png, ...)"
        )
    return tuple(Path(p) for p in images)


def local(uri: str) -> Path | None:
    """``uri`` as a path on this machine; None for a URI with a scheme (s3a://, dbfs:/, file://), which Spark
    reads."""
    return None if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri) else Path(uri)


def read_here(source: str) -> bool:
    """Whether the table ``source`` is checked on this machine before Spark starts: a local path, not a URI or a
    glob (Spark expands ``*``, ``?``, ``[...]`` and ``{a,b}``)."""
    return local(source) is not None and not re.search(r"[*?[{]", source)


def local_out(out: str) -> Path | None:
    """``--out`` as a local path, checked before Spark starts: it must not exist, and its folder must exist and be
    writable. None for a URI (Spark checks it when it writes)."""
    path = local(out)
    if path is None:
        return None
    if path.exists() or path.is_symlink():
        raise DataError(f"--out {out}: already exists (Spark does not overwrite a table; give a new path)")
    if not path.parent.is_dir():
        raise DataError(f"--out {out}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DataError(f"--out {out}: the folder {path.parent} is not writable")
    return path


def spark_type(dtype) -> str:
    """The name Spark gives the Arrow type ``dtype`` of a Parquet column where it is one the table's columns
    may be (``string``, ``binary``, ``void``); else the Arrow type's own name."""
    import pyarrow as pa

    if pa.types.is_null(dtype):
        return NO_TYPE
    if pa.types.is_dictionary(dtype):  # pandas' categories
        dtype = dtype.value_type
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return "binary"
    return str(dtype)


def table_facts(source: str) -> tuple[dict[str, str], int]:
    """The columns of the Parquet table ``source`` on this machine (a file or a folder of part files) with their
    types as Spark names them, and its number of rows; read from the files' footers, not their data."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not Path(source).exists():
        raise DataError(f"{source}: no such file or folder")
    try:
        table = ds.dataset(source, format="parquet", partitioning="hive")
        return {field.name: spark_type(field.type) for field in table.schema}, table.count_rows()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{source}: cannot read it as a Parquet table ({str(err).splitlines()[0]})") from None


def check_table(source: str, columns: dict[str, str], rows: int) -> None:
    """One line on what makes the table ``source`` (its ``columns`` and their types, its number of ``rows``)
    unscorable: no image or path column, a column of a type the model cannot read, no rows."""
    if "image" not in columns and "path" not in columns:
        raise DataError(
            f"{source}: a table needs an image column ({COLUMNS['image'][1]}) or a path column "
            f"({COLUMNS['path'][1]}); it has {', '.join(columns) or 'no columns'}"
        )
    for name, (types, meaning) in COLUMNS.items():
        if columns.get(name, types[0]) not in (*types, NO_TYPE):
            raise DataError(f"{source}: column {name} is {columns[name]}, not {' or '.join(types)} ({meaning})")
    if not rows:
        raise DataError(f"{source}: no rows to score")


def result_type(model: str):
    """The UDF's result for the registered ``model``: a struct of the model's output columns (its signature: the
    columns of `aigid detect` but ``path``), every one nullable, as a row that was not scored has null scores."""
    import mlflow
    from pyspark.sql.types import StructField, StructType

    uri = registry_store()
    try:
        outputs = mlflow.models.get_model_info(model).signature.outputs.as_spark_schema()
    except Exception as err:  # the registry raises several types; all mean "cannot use this model"
        raise DataError(
            f"--model {model}: cannot read the model's output columns from {uri} ({type(err).__name__}: {err}); "
            f"`aigid register` registers models/retrained in this store"
        ) from None
    return StructType([StructField(field.name, field.dataType, True) for field in outputs.fields])


def start_spark(master: str, conf: dict[str, str]):
    """The running Spark session (a notebook's, a job's), else a new one on ``master`` with ``conf``; and whether
    this command started it (and so stops it)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError("aigid score-table needs pyspark: pip install 'aigid[spark]' (or pyspark)") from None
    running = SparkSession.getActiveSession()
    if running is not None:
        return running, False
    builder = SparkSession.builder.master(master).appName("aigid score-table")
    for key, value in conf.items():
        builder = builder.config(key, value)
    try:
        return builder.getOrCreate(), True
    except Exception as err:  # no Java, a bad master URL: pyspark and py4j raise several types
        raise DataError(f"--master {master}: cannot start Spark ({first_line(err)})") from None


def first_line(err: Exception) -> str:
    """The first line of a Spark error: a Java exception's own message rather than py4j's call site."""
    java = getattr(err, "java_exception", None)
    text = str(java.toString() if java is not None else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_input(spark, job: Job):
    """The rows to score, numbered in their order: ``path`` and ``file`` (where an executor reads it) for a folder
    of images; a table's ``path``, ``image`` and ``caption`` (:data:`COLUMNS`). A table given by a URI or a glob
    is checked here (:func:`check_table`), one on this machine was before Spark started."""
    from pyspark.sql import functions as F

    if job.images is not None:
        import pandas as pd

        files = pd.DataFrame({"path": [str(p) for p in job.images], "file": [os.path.abspath(p) for p in job.images]})
        table = spark.createDataFrame(files)
    else:
        table = spark.read.parquet(job.source)
        columns = {field.name: field.dataType.simpleString() for field in table.schema.fields}
        if not read_here(job.source):
            check_table(job.source, columns, 0 if table.isEmpty() else 1)
        # A column of no type in the file (all null; checked before Spark started), Spark reads as int.
        table = table.select(
            *(
                F.col(name) if columns[name] in types else F.lit(None).cast(types[0]).alias(name)
                for name, (types, _) in COLUMNS.items()
                if name in columns
            )
        )
        if "image" not in table.columns:
            table = table.withColumn("file", F.col("path"))
    return table.withColumn(ROW, F.monotonically_increasing_id())


def spread(table, partitions: int):
    """``table`` split by its order into ``partitions`` tasks where Spark would read it in fewer (a small
    Parquet file is one), so that every core scores; a table read in more is left as it is."""
    if table.rdd.getNumPartitions() >= partitions:
        return table
    return table.repartitionByRange(partitions, ROW)


def read_files(batches):
    """For ``mapInPandas``, on the executors: each batch with ``image``, the bytes of its ``file``, in place of
    ``file``, and ``read_error`` where the file cannot be read (its image is then null)."""
    for batch in batches:
        read = [read_file(file) for file in batch["file"]]
        yield batch.drop(columns="file").assign(image=[r[0] for r in read], read_error=[r[1] for r in read])


def read_file(file) -> tuple[bytes | None, str | None]:
    """A file's bytes, or why it cannot be read: the message `aigid detect` gives (:func:`aigid.core.data.read_file`:
    "not a regular file" for a pipe or a device, which reading would wait on or never finish); "no path" for a
    null or empty path (which pandas hands over as None or NaN)."""
    if not isinstance(file, str) or not file:
        return None, "no path"
    try:
        return data.read_file(file), None
    except DataError as err:
        return None, str(err)


def with_images(table):
    """``table`` with ``image`` (read from ``file`` on the executors where the table has no images) and
    ``read_error``."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BinaryType, StringType, StructField, StructType

    if "image" in table.columns:
        return table.withColumn("read_error", F.when(F.col("image").isNull(), F.lit("no image")))
    kept = [field for field in table.schema.fields if field.name != "file"]
    schema = StructType([*kept, StructField("image", BinaryType()), StructField("read_error", StringType())])
    return table.mapInPandas(read_files, schema)


def scored(table, model, columns: list[str], caption: str):
    """The output rows in the input's order: ``path`` where the input has it, then the model's ``columns``. A row
    that was not scored has its error (the file's, else the model's) and null scores; its caption stays."""
    from pyspark.sql import functions as F

    captions = F.coalesce(F.col("caption"), F.lit(caption)) if "caption" in table.columns else F.lit(caption)
    table = table.withColumn(SCORES, model(F.struct(F.col("image"), captions.alias("caption"))))
    error = F.coalesce(F.col("read_error"), F.regexp_replace(F.col(f"{SCORES}.error"), BATCH_ROW, ""))

    def column(name: str):
        if name == "error":
            return error.alias(name)
        value = F.col(f"{SCORES}.{name}")
        # null scores where a row failed: spark_udf casts a string column with astype(str), so a missing verdict
        # would be the text "None"
        return (value if name == "caption" else F.when(error == "", value)).alias(name)

    keys = ["path"] if "path" in table.columns else []
    return table.select(*keys, *map(column, columns), ROW).sortWithinPartitions(ROW).drop(ROW)


def score_table(spark, job: Job, result) -> tuple[int, int]:
    """Score every row of ``job.source`` with the registered model on ``spark`` (``result``: the struct of its
    output columns, :func:`result_type`), write them to ``job.out``; return the rows and how many failed."""
    import mlflow
    from pyspark.sql import functions as F

    table = spread(read_input(spark, job), job.partitions or spark.sparkContext.defaultParallelism)
    model = mlflow.pyfunc.spark_udf(spark, job.model, result_type=result, env_manager="local")
    scored(with_images(table), model, result.fieldNames(), job.caption).write.parquet(job.out)
    written = spark.read.parquet(job.out).agg(F.count("*"), F.sum((F.col("error") != "").cast("int"))).first()
    return written[0], written[1] or 0


def parse_conf(ctx, param, values) -> dict[str, str]:
    pairs = dict(value.partition("=")[::2] for value in values)
    if any(not key or not value for key, value in pairs.items()):
        raise click.BadParameter("give KEY=VALUE, e.g. spark.executor.memory=4g", ctx, param)
    return pairs


@click.command(name="score-table")
@click.argument("source")
@click.option(
    "--out",
    required=True,
    help="Parquet table to write (a folder of part files, as Spark writes tables): a local path or a URI Spark "
    "writes (s3a://, hdfs://, abfss://, dbfs:/). It must not exist; a local one's folder must exist and be "
    "writable.",
)
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Registered model, models:/<name>@<alias> or models:/<name>/<version>, from the MLflow store "
    "(MLFLOW_TRACKING_URI, else the project's mlflow.db).",
)
@click.option(
    "--master",
    default="local[2]",
    show_default=True,
    help="Spark master URL: local[N], spark://host:7077, yarn, k8s://https://host:6443. Where a Spark session "
    "is already running (a notebook, spark-submit), that one is used.",
)
@click.option(
    "--caption",
    default="",
    help="Caption of every image without one: a folder's, or a table's without a caption column or with a "
    "null caption (default: none).",
)
@click.option(
    "--partitions",
    type=click.IntRange(1),
    help="Split a table read in fewer pieces into this many tasks (default: Spark's default parallelism, the "
    "cores of local[N] or of the executors).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Rows per Arrow batch handed to the model (spark.sql.execution.arrow.maxRecordsPerBatch).",
)
@click.option(
    "--conf",
    "conf",
    multiple=True,
    metavar="KEY=VALUE",
    callback=parse_conf,
    help="A Spark setting for a new session, as spark-submit's --conf (repeatable); e.g. "
    "spark.executor.resource.gpu.amount=1.",
)
@click.pass_context
@clean_errors
def command(ctx, source, out, model, master, caption, partitions, batch_size, conf) -> None:
    """Score a Parquet table of images (columns image or path, optional caption) or a folder of images on Spark
    with a registered model, through MLflow's spark_udf; write a Parquet table with the columns of detect.

    A row that cannot be read or decoded gets its error and null scores. Exit status: 0 every row scored; 1
    nothing scored (bad --model, --out or input, no image found, no row readable); 2 a usage error; 3 some rows
    could not be read.
    """
    target = local_out(out)
    job = Job(source, out, model, caption, partitions, list_images(source))
    if job.images is None and read_here(source):
        check_table(source, *table_facts(source))
    result = result_type(model)
    spark, started = start_spark(master, {"spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_size)} | conf)
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    # A local --out is written beside itself and moved into place at the end: a failed job leaves none. Spark stops
    # before the scratch table is removed or moved, so that no task is still writing to it.
    with atomic_path(target) if target else nullcontext(out) as scratch:
        try:
            rows, failed = score_table(spark, replace(job, out=str(scratch)), result)
        except (PySparkException, Py4JError) as err:  # a missing table, an executor that cannot load the model
            raise DataError(f"{source}: scoring into {out} failed on Spark ({first_line(err)})") from None
        finally:
            if started:
                spark.stop()
    report(ctx, rows, failed, out)


def report(ctx, rows: int, failed: int, out: str) -> None:
    """Say what was written; exit 1 when nothing was scored, 3 when some rows failed."""
    if failed == rows:
        raise click.ClickException(f"none of the {rows} row(s) could be scored (the error column of {out} says why)")
    click.echo(f"wrote {rows} row(s) to {out}", err=True)
    if failed:
        click.echo(f"{failed} of {rows} row(s) could not be read (the error column says why)", err=True)
        ctx.exit(SOME_FAILED)
