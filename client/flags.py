"""The institution's command-line flags (``fedkd teacher``, ``fedkd train-teacher``), torch-free.

Parsing them, ``--help`` included, imports neither torch nor a model: the commands load those only once the
flags are read (:mod:`fedkd.client.cli`, :mod:`fedkd.client.train`).
"""

from __future__ import annotations

import argparse

from fedkd.institution.privacy.settings import LABEL_COUNT_NOISE, MODES, PrivacySettings
from fedkd.options import BATCH_LIMIT, TIMEOUT_LIMIT, address, argument

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # an institution's operator reads these lines
DEFAULT = PrivacySettings()  # the flags' defaults are the settings' own
# The privacy flags, by the PrivacySettings field each sets: one table reads the flags into settings and writes
# settings as flags (fedkd run's transport=grpc starts its agents with them).
PRIVACY_FLAGS = {"mode": "--privacy-mode", "budget": "--privacy-budget", "delta": "--delta",
                 "output_noise": "--output-noise", "output_clip": "--output-clip", "gradient_clip": "--gradient-clip",
                 "label_count_noise": "--label-count-noise", "label_count_epsilon": "--label-count-epsilon",
                 "pate_threshold": "--pate-threshold", "pate_sigma1": "--pate-sigma1", "pate_sigma2": "--pate-sigma2"}


def privacy_from_args(args: argparse.Namespace) -> PrivacySettings:
    """The client's privacy settings from its flags."""
    values = {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in PRIVACY_FLAGS.items()}
    return PrivacySettings(**values, share_label_counts=not args.no_label_counts)


def privacy_flags(settings: PrivacySettings) -> list[str]:
    """``fedkd teacher``'s flags that give an agent ``settings`` (what :func:`privacy_from_args` reads back)."""
    flags: list[str] = []
    for name, flag in PRIVACY_FLAGS.items():
        value = getattr(settings, name)
        flags += [flag, value if isinstance(value, str) else repr(value)]
    return flags + ([] if settings.share_label_counts else ["--no-label-counts"])


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    teacher = parser.add_argument_group("the teacher: a checkpoint fedkd trained, or the institution's own model")
    teacher.add_argument("--checkpoint", help="a teacher checkpoint fedkd trained (fedkd.teacher.v1)")
    teacher.add_argument("--model", metavar="SPEC", help="your own classifier: torchvision:NAME, "
                         "PACKAGE.MODULE:CALLABLE (your code, on PYTHONPATH), an exported program (.pt2), or a "
                         "fedkd model name; with --task and --weights")
    teacher.add_argument("--weights", help="--model's trained weights: a state dict saved with torch.save "
                         "(read with weights_only=True)")
    teacher.add_argument("--task", help="the task card (TOML: classes, input-shape, mean, std) --model serves")
    teacher.add_argument("--model-args", metavar="JSON", help="keyword arguments for --model's constructor, as a "
                         "JSON object (for example '{\"num_classes\": 7}')")
    teacher.add_argument("--label-counts", metavar="N,N,...|DIR", help="--model: how many training records of "
                         "each class, in the task's order, or the training data's ImageFolder to count them (released "
                         "as the privacy mode says); default: not shared")
    teacher.add_argument("--eval-data", metavar="DIR", help="held-out labelled images of your own (an ImageFolder: "
                         "one sub-folder per class of the task, named as its classes; a --checkpoint's classes are "
                         "named 0, 1, ...): at the end of the run this institution evaluates the student on them and "
                         "releases only the counts, through its privacy policy and ledger")
    teacher.add_argument("--unknown-output", action="store_true", help="--model answers one logit more than the task "
                         "has classes, last: 'unknown', its own estimate that an input is none of what it learned (an "
                         "open-set model); the coordinator weighs its answers by 1 - p(unknown)")
    teacher.add_argument("--density-data", metavar="DIR", help="--model: your own training images (an ImageFolder "
                         "of the task): their density is fitted here and every answer carries the input's "
                         "log-density under it, one output more; the coordinator weighs your answers by how much "
                         "the input looks like your data (a fedkd-trained --checkpoint: train-teacher --set "
                         "teacher-density=on). A coordinator can climb the density to a class-mean image of yours "
                         "(simulations/density_leak.py), and, where your privacy mode is none, ask for images drawn "
                         "from it (a class's mean with its own spread: what its gradients give, in one query)")
    teacher.add_argument("--class-statistics", action="store_true", help="--checkpoint: release the "
                         "class-feature-statistics term on the per-class BatchNorm statistics the checkpoint holds "
                         "(train-teacher --set teacher-class-statistics=on); they say more about your data than the "
                         "model's running statistics")
    teacher.add_argument("--class-statistics-data", metavar="DIR", help="--model with BatchNorm layers: your own "
                         "training images (an ImageFolder of the task); the per-class BatchNorm statistics of them are "
                         "computed here and the class-feature-statistics term is released on them")
    parser.add_argument("--connect", required=True, metavar="HOST:PORT", type=address, help="the coordinator's hub")
    parser.add_argument("--token-file", help="file holding this teacher's token (from the coordinator)")
    parser.add_argument("--ca", help="CA certificate (PEM) that signed the hub's certificate; default: system roots")
    parser.add_argument("--cert", help="this teacher's client certificate (PEM), for mutual TLS")
    parser.add_argument("--key", help="the key of --cert (PEM)")
    parser.add_argument("--insecure", action="store_true", help="plaintext, no TLS (loopback experiments only)")
    parser.add_argument("--server-name", help="TLS name to expect when it differs from the host in --connect")
    parser.add_argument("--session", default="", help="the run to join (refused when the hub runs another)")
    parser.add_argument("--name", default="", help="a name for this teacher in the hub's logs")
    parser.add_argument("--max-batch", type=argument(int, 1, BATCH_LIMIT), default=1024,
                        help="largest query batch answered (default 1024)")
    parser.add_argument("--access", default="logits,gradient",
                        help="access modes granted: gradient,logits (default), logits, or labels (hard labels "
                        "only)")
    parser.add_argument("--no-label-counts", action="store_true", help="do not share the label histogram")
    privacy = parser.add_argument_group("privacy (this client's own; nothing the coordinator sends changes it)")
    privacy.add_argument("--privacy-mode", choices=MODES, default=DEFAULT.mode,
                         help="none; dp-sgd (the checkpoint was trained with DP-SGD; answers are free); "
                         "output-noise (clipped, noised logits and input gradients, accounted per query sample); "
                         "pate (the checkpoint holds shard teachers; labels by Confident-GNMax, accounted per row)")
    privacy.add_argument("--privacy-budget", type=argument(float, 0.0, 1e6), default=DEFAULT.budget,
                         help="total epsilon this client allows, training included; 0 = unlimited (reported)")
    privacy.add_argument("--delta", type=argument(float, 0.0, 0.1), default=DEFAULT.delta,
                         help="delta of the guarantee (default: the training's, else 1 / (10 n))")
    privacy.add_argument("--output-noise", type=argument(float, 1e-6, 1e6), default=DEFAULT.output_noise,
                         help="output-noise: Gaussian std / (2 x clip) per released row (default %(default)s)")
    privacy.add_argument("--output-clip", type=argument(float, 1e-6, 1e6), default=DEFAULT.output_clip,
                         help="output-noise: L2 norm logits rows are clipped to (default %(default)s)")
    privacy.add_argument("--gradient-clip", type=argument(float, 1e-6, 1e6), default=DEFAULT.gradient_clip,
                         help="output-noise: L2 norm input-gradient rows are clipped to (default %(default)s)")
    privacy.add_argument("--label-count-noise", choices=LABEL_COUNT_NOISE, default=DEFAULT.label_count_noise,
                         help="noise on the released label histogram (auto: none without a mechanism, else gaussian)")
    privacy.add_argument("--label-count-epsilon", type=argument(float, 1e-6, 1e4), default=DEFAULT.label_count_epsilon,
                         help="what the noisy label histogram costs (default %(default)s)")
    privacy.add_argument("--pate-threshold", type=argument(float, 0.0, 1e6), default=DEFAULT.pate_threshold,
                         help="pate: answer a row only when its noisy top vote reaches this (default %(default)s)")
    privacy.add_argument("--pate-sigma1", type=argument(float, 1e-6, 1e6), default=DEFAULT.pate_sigma1,
                         help="pate: noise std of the threshold check (default %(default)s)")
    privacy.add_argument("--pate-sigma2", type=argument(float, 1e-6, 1e6), default=DEFAULT.pate_sigma2,
                         help="pate: noise std on each vote count for the answer (default %(default)s)")
    privacy.add_argument("--ledger", help="file of this client's privacy ledger (default: beside the checkpoint, "
                         "NAME.ledger.json); every release is recorded there before it is made")
    parser.add_argument("--max-message-mb", type=argument(float, 0.01, 2000.0), default=64.0,
                        help="largest gRPC message (default 64)")
    parser.add_argument("--give-up-after", type=argument(float, 0.0, TIMEOUT_LIMIT), default=600.0,
                        help="seconds without a session before giving up (default 600)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                        help="torch device for the teacher: cpu (default), cuda, or auto (CUDA when present)")
    parser.add_argument("--num-threads", type=argument(int, 0, 1024), default=0,
                        help="torch threads (default: torch's choice)")


# What a teacher's training reads from the settings (--set KEY=VALUE); anything else is the coordinator's.
TRAINING_KEYS = ("seed", "teacher-epochs", "teacher-lr", "teacher-batch-size", "teacher-label-smoothing",
                 "teacher-recipe", "teacher-density", "teacher-class-statistics", "dp-epsilon", "dp-delta",
                 "dp-max-grad-norm", "dp-batch-size",
                 "dp-lr", "dp-feature-epsilon", "dp-feature-clip", "device", "num-threads")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="the task card (TOML: classes, input-shape, mean, std)")
    parser.add_argument("--data", required=True, help="the training data: an ImageFolder directory, or a .npz "
                        "with x_train, y_train")
    parser.add_argument("--model", default="lenet5", metavar="SPEC", help="a fedkd model name or torchvision:NAME "
                        "(default lenet5)")
    parser.add_argument("--model-args", metavar="JSON", help="keyword arguments of a torchvision model")
    parser.add_argument("--privacy-mode", choices=("none", "dp-sgd"), default="none",
                        help="dp-sgd: train with Opacus DP-SGD (dp-epsilon, dp-delta, ... via --set)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a training setting: {', '.join(TRAINING_KEYS)}")
    parser.add_argument("--out", required=True, help="the checkpoint to write (fedkd.teacher.v1)")


def teacher_parser() -> argparse.ArgumentParser:
    """``fedkd teacher``'s parser."""
    parser = argparse.ArgumentParser(prog="fedkd teacher", description="institution: serve a teacher (a checkpoint "
                                     "fedkd trained, or your own model) to a coordinator's hub. The agent dials out "
                                     "(no inbound port), answers queries until the coordinator ends the session, and "
                                     "prints what it released.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_teacher_arguments(parser)
    return parser


def training_parser() -> argparse.ArgumentParser:
    """``fedkd train-teacher``'s parser."""
    parser = argparse.ArgumentParser(prog="fedkd train-teacher", description="institution: train a teacher on your "
                                     "own data (an ImageFolder or a .npz) with fedkd's recipe, DP-SGD optional, and "
                                     "write the checkpoint fedkd teacher --checkpoint serves.")
    add_training_arguments(parser)
    return parser

