"""The `hivemind-pool submit` options of the ml and data task kinds, and the spec they make."""

from __future__ import annotations

import argparse
from pathlib import Path

from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.spec_checks import TaskSpecError
from hivemind_worker.task_params import FRAMEWORKS, PROCESSING_TYPES, param_value, parse_param

RUNNER_MEMORY_MB = 1536  # pandas and scikit-learn need more than a plain task's default


def add_runner_options(p: argparse.ArgumentParser, what: argparse._MutuallyExclusiveGroup) -> None:
    """--ml and --data (beside --python and --image in `what`) and their options."""
    what.add_argument("--ml", choices=FRAMEWORKS, help="train a model with the worker's runner")
    what.add_argument(
        "--data",
        choices=[k.replace("_", "-") for k in PROCESSING_TYPES],
        help="process the --input with the worker's runner",
    )
    ml = p.add_argument_group("--ml training")
    ml.add_argument("--model", default="", help="e.g. random-forest-classifier; mlp or cnn")
    ml.add_argument("--train", type=Path, metavar="FILE", help="CSV or Parquet training data")
    ml.add_argument("--dataset", default="", help="a data set the library ships: iris, digits...")
    ml.add_argument("--target", default="", help="the target column")
    ml.add_argument("--feature", action="append", default=[], help="a feature column; repeatable")
    ml.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a hyper-parameter (int, float, true/false or text); repeatable",
    )
    ml.add_argument("--metric", action="append", default=[], help="a metric to report")
    ml.add_argument("--validation-split", type=float, default=0.0, metavar="X")
    ml.add_argument("--k-folds", type=int, default=0, metavar="K")
    ml.add_argument("--seed", type=int, default=0)
    ml.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="TYPE[:N[:ACTIVATION]]",
        help="a layer of a declared network, e.g. dense:64:relu; repeatable",
    )
    ml.add_argument("--epochs", type=int, default=0)
    ml.add_argument("--batch-size", type=int, default=0)
    ml.add_argument("--learning-rate", type=float, default=0.0)
    ml.add_argument("--problem", default="", choices=["", "classification", "regression"])
    data = p.add_argument_group("--data processing (the first --input is processed)")
    data.add_argument("--group-by", action="append", default=[], metavar="COLUMN")
    data.add_argument("--aggregate", action="append", default=[], metavar="COLUMN")
    data.add_argument("--aggregation", action="append", default=[], metavar="FUNC")
    data.add_argument("--correlation", default="")
    data.add_argument("--resize", default="", metavar="WxH")
    data.add_argument("--thumbnail", default="", metavar="WxH")
    data.add_argument("--format", default="", help="png, jpeg, webp, gif, bmp or tiff")
    data.add_argument("--grayscale", action="store_true")
    data.add_argument("--rotate", type=int, default=0, metavar="DEGREES")
    data.add_argument("--filter", action="append", default=[], metavar="NAME")
    data.add_argument("--quality", type=int, default=0)
    data.add_argument("--top-terms", type=int, default=0, metavar="N")
    data.add_argument("--ngram", action="append", type=int, default=[], metavar="N")
    data.add_argument("--stop-word", action="append", default=[], metavar="WORD")  # fmt: skip


def runner_spec(spec: pb.TaskSpec, args: argparse.Namespace, train: list[pb.InputFile]) -> None:
    """An ml or data task from the command line (`train`: the --train file's inputs); the pool
    checks what it means. A malformed option raises ValueError with the reason."""
    if args.ml:
        spec.kind = pb.TASK_KIND_ML
        m = spec.ml
        m.framework, m.model, m.dataset, m.target = args.ml, args.model, args.dataset, args.target
        if args.train is not None:
            spec.input_files.extend(train)
            m.train_path = train[0].path if args.train.is_file() else args.train.name
        m.features.extend(args.feature)
        m.metrics.extend(args.metric)
        m.validation_split, m.k_folds, m.seed = args.validation_split, args.k_folds, args.seed
        m.epochs, m.batch_size, m.learning_rate = args.epochs, args.batch_size, args.learning_rate
        m.task = args.problem
        for item in args.param:
            try:
                name, value = parse_param(item)
            except TaskSpecError as exc:
                raise ValueError(f"--param {exc.reason}") from None
            m.hyperparameters[name].CopyFrom(param_value(value))
        for item in args.layer:
            kind, _, rest = item.partition(":")
            units, _, activation = rest.partition(":")
            if units and not units.isdigit():
                raise ValueError(f"--layer {item!r}: the size after the type is a whole number")
            size = int(units or 0)
            layer = pb.Layer(type=kind, activation=activation)
            if kind == "dropout":
                layer.rate = size / 100
            elif kind in ("conv2d",):
                layer.filters, layer.kernel_size = size, 3
            elif kind == "maxpool2d":
                layer.kernel_size = size or 2
            else:
                layer.units = size
            m.layers.append(layer)
        spec.name = spec.name or f"{args.ml} {args.model}"
        return
    spec.kind = pb.TASK_KIND_DATA
    processing = args.data.replace("-", "_")
    if not args.input:
        raise ValueError(f"--data {args.data} needs --input FILE or FOLDER")
    first = args.input[0]
    spec.data.processing = processing
    spec.data.input_path = first.name
    if processing == "csv_analysis":
        spec.data.csv.CopyFrom(pb.CsvAnalysis(
            group_by=args.group_by, aggregate=args.aggregate, aggregations=args.aggregation,
            correlation=args.correlation,
        ))  # fmt: skip
    elif processing == "image_processing":
        image = pb.ImageProcessing(
            format=args.format, grayscale=args.grayscale, rotate=args.rotate,
            filters=args.filter, quality=args.quality,
        )  # fmt: skip
        box = args.thumbnail or args.resize
        if box:
            width, sep, height = box.lower().partition("x")
            if not (sep and width.isdigit() and height.isdigit()):
                raise ValueError(f"{box!r} is not WIDTHxHEIGHT, e.g. 256x256")
            image.width, image.height, image.thumbnail = (
                int(width),
                int(height),
                bool(args.thumbnail),
            )
        spec.data.image.CopyFrom(image)
    else:
        spec.data.text.CopyFrom(pb.TextAnalysis(
            top_terms=args.top_terms, ngrams=args.ngram, stop_words=args.stop_word,
        ))  # fmt: skip
    spec.name = spec.name or f"{args.data} {first.name}"
