"""What the refit should train on, and how: probes on a finished run's own final pool (issue 26).

For each run directory (``fedkd run --out RUN`` or a ``simulations/fashion_mnist.py`` run: its teachers under
``RUN/clients``, its final pool and generator in ``RUN/checkpoint.pt``), the run's student is trained afresh with
the run's trainer and optimiser for ``student-refit``'s steps, as the refit does, in each way named by
``--variants``:

- ``pool``: the final pool and its stored answers (what ``student-refit`` does), with beside it the same
  training's weights averaged (``ema``: an exponential average, decay 0.999; ``swa``: a uniform average over the
  second half of the steps; BatchNorm buffers averaged alike, ``torch.optim.swa_utils``);
- ``l1``, ``mse``, ``klT`` (for example ``kl2``): the pool with another loss (L1 on the logits, squared error on
  logits centred per row, KL at temperature T);
- ``lsT`` (for example ``ls2``): the pool with logit standardisation (Sun et al., CVPR 2024, authors' code
  ``sunshangquan/logit-standardization-KD``): the student's and the ensemble's logits z-scored per row, then KL at
  temperature T, so the student matches the ensemble's ranking of the classes, not how sure it is;
- ``balanced``: the pool drawn so that every class of the ensemble's answers (argmax) is met equally often, each
  sample in inverse proportion to its class's count (no query: whether the student under-calls a class, shirts on
  Fashion-MNIST, because the pool holds fewer of it);
- ``blends``: the pool plus as many random blends of pool pairs (a uniform weight each), answered by the teachers
  (what ``student-refit-mixup=1`` asks: one Forward of each blend by every teacher);
- ``blends-runner-up``: the pool plus as many blends of pool pairs joined across the ensemble's closest boundary:
  each pool image with a random pool image of the class its stored answer ranks second, answered by the teachers
  (the queries of ``blends``, aimed where the ensemble itself hesitates; ``classes``: what the teachers call them);
- ``surrogate``: the pool plus the same blends answered by the ensemble of ``--students`` students refitted on the
  pool (no query: whether the blends' value is the blending or the teachers' answers);
- ``fresh``: the pool plus as many fresh samples of the run's final generator, drawn as the run draws its
  Forward-only batches (``Synthesizer.draw``), answered by the teachers (the same queries as ``blends``);
- ``flips``: the pool plus every pool image mirrored left to right, with the stored answer of the image it mirrors
  (no query: whether the task's labels survive a flip is assumed, as DENSE's student training assumes it; wrong for
  digits);
- ``flipsq``: the same mirrored images answered by the teachers (the queries of ``blends``);
- ``jacobian``: the pool, the student also trained to match the ensemble's input gradients there (Jacobian matching,
  Srinivas and Fleuret, ICML 2018): per sample, the direction of d log p_ens(y|x) / dx for y the stored answer's
  class, which the coordinator could get with one Forward and one Backward of every pool sample by every teacher
  (the Backward's grad_logits is d log p_ens(y) / d logits_k; both counted), against the direction of the
  student's own d log p_S(y|x) / dx, squared distance weighted by ``JACOBIAN_WEIGHT`` (weight 10 diverged);
- ``jacobian-logits``: the same with the gradient of each teacher's centred logit of y, weighted by its class share,
  summed (the Backward's grad_logits w[k, y] (onehot(y) - 1/C) needs no Forward: one Backward per sample and
  teacher), against the student's own centred logit's;
- ``odsE`` (for example ``ods8``): the pool plus every pool image moved by one step of output-diversified sampling
  (Tashiro et al., NeurIPS 2020; the hard samples Co-Boosting's student trains on, ICLR 2024): E/255 in pixels
  along the sign of the input gradient of w . (each teacher's centred logits, weighted by its class shares), w a
  random direction in the classes per image, then answered by the teachers (a Backward with grad_logits a - mean a,
  a = w_k * w for teacher k's class shares w_k, needs no answer; then a Forward of the moved image: two query
  samples per image and teacher);
- ``ontoK`` (for example ``onto10``): the pool plus every pool image moved by K gradient steps up the log-density of
  the clients' pooled data (the mixture of the teachers' densities, ``teacher-density=on``, weighted by their
  records), then answered by the teachers: whether synthetic samples the densities find likely (a synthetic pool
  sits far below every client's density, where the density gate routes to whichever falls off slowest) teach the
  student of a density-gated ensemble what the pool does not. Each step is ``ONTO_RATE`` times the smallest
  variance any density keeps off its principal directions (what the coordinator does not know: a probe's step,
  read from the densities); each step's Forward and Backward (a density each) and the answers' Forwards are
  counted. ``ontoeachK``: image i climbs teacher i mod K's density alone (one teacher asked a step); ``ontobbK``:
  the same with each image's own Barzilai-Borwein steps, which need no variance (what ``student-refit-climb``
  does through the contract, :func:`fedkd.coordinator.climb.climb`); ``ontohalfK``: those steps halved
  (``ONTO_DAMPING``), a gentler climb that still needs no variance; ``ontoclassK``: BB steps up one class's component of
  one teacher's density, the (teacher, class) pairs in turn (every class a client holds gets as many images, where a
  whole density sends most to its broadest class); ``ontoclasshalfK``: the same, BB steps halved (the second step then
  takes half of what lies off the class's principal directions, not all). Any of them with the suffix ``-balanced``
  (``ontobb2-balanced``): the refit draws the pool and the climbed images so that every class of their answers (argmax)
  is met equally often, as ``balanced`` draws the pool; with ``-only`` (``ontoclass2-only``): the refit trains on the
  climbed images alone, without the pool; with ``-blended`` or ``-runnerup``: on as many blends of the climbed images
  again as well (random pairs, or each with one of the class its answer ranks second: the boundaries between classes,
  and between clients, that no one class's climb reaches), answered by the teachers; with ``-twice``: two copies of
  each pool image climb, to two (teacher, class) pairs (the refit's steps unchanged); with ``-fresh``: as many fresh
  draws of the run's final generator climb in place of the pool's copies (drawn as ``fresh`` draws them; the same
  queries). Every onto variant needs a run
  whose teachers answer densities (``teacher-density=on``); its moved images are answered as the run answered its
  pool, under the density gate where the run weighed by it, by the class-weighted ensemble where it did not.
- ``drawn``: the pool plus as many images drawn from the teachers' densities themselves, one (teacher, class) pair's
  component after another as ``ontoclassK`` climbs them (:func:`drawn_from_densities`: a probabilistic-PCA draw,
  the class mean plus each principal direction times its own spread plus the isotropic rest), answered as the onto
  variants' images are. What a client could release were the contract to let it draw from the density it already
  serves (it has no such request today): the climb keeps the spread the generator's images happen to have along a
  class's principal directions; a draw has the class's own.
- ``proxy``: the pool plus the 5,000 MNIST-5k images (every image of the built-in digits, a task other than the
  run's; resized and given the run's channels where its images differ), answered by the teachers: whether natural
  images of another domain, which the coordinator could hold without anyone's data (as FedDF's and MosaicKD's
  unlabelled proxy sets), teach what the synthetic pool does not. Not data-free: a question for the synthesizer,
  not a method fedkd offers.
- ``fill-real``: the pool (and its blends, where the run made them) plus, for every class the pool holds under half
  a balanced share of (by the stored answers' argmax; ``thin_classes``), as many of the task's own training images
  of the class as bring it there, answered by the teachers: an oracle of what filling a pool's thin classes is
  worth at best (the coordinator holds no such image);
- ``fill``: the same classes filled with synthetic samples: the pool images the stored answers give the class the
  highest probability, moved by ``FILL_STEPS`` Adam steps on the pixels towards it (cross-entropy to the class on
  the ensemble plus 0.1 times the teachers' BatchNorm-statistics distance; a Forward and a Backward of every
  teacher a step), then answered.

Each row gives the student's test accuracy and its recall of each class (``recall``, in class order: where a
variant's gain or loss lies, shirts on Fashion-MNIST). Every refit of the pool alone uses seed 100
(``--refit-seed``: the ``pool``, loss and ``jacobian`` rows; the surrogate's students 100, 101, ...), every refit
with extra samples seed 200 (``--extra-seed``): rows differ by what they train on, not by their random stream. The
refit's own spread over seeds is printed too (``students``: the surrogate's students one by one, and their
ensemble). ``--density-rank R`` fits each teacher's density again at R principal directions a class on its client's
share of the split before the onto variants climb it (the clients' ``DEFAULT_RANK`` is 30). Experiment-only: it
reads the teachers' files, which a deployment's coordinator does not hold.

    python simulations/refit_probe.py runs/fashion-mnist/a0.5-s0-... --variants pool,blends,surrogate,fresh
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gate_probe import answers, combine, density_weighed, records_of, run_teachers, stacked  # noqa: E402

import fedkd.coordinator.student as student_module  # noqa: E402
from fedkd.config import RunConfig, config_from_mapping  # noqa: E402
from fedkd.coordinator.climb import climb  # noqa: E402
from fedkd.coordinator.losses import distillation_per_sample  # noqa: E402
from fedkd.coordinator.student import StudentTrainer  # noqa: E402
from fedkd.coordinator.synthesis import Synthesizer  # noqa: E402
from fedkd.data import DatasetSpec, load_dataset  # noqa: E402
from fedkd.institution.density import WithDensity, density_of  # noqa: E402
from fedkd.institution.terms import FeatureStatistics  # noqa: E402
from fedkd.institution.training import client_partitions  # noqa: E402
from fedkd.metrics import predict  # noqa: E402
from fedkd.models import build_model  # noqa: E402

VARIANTS = ("pool", "balanced", "l1", "mse", "kl1", "kl2", "blends", "blends-runner-up", "surrogate", "fresh", "flips",
            "flipsq", "jacobian", "jacobian-logits", "proxy", "fill", "fill-real", "drawn")
POOL_SEED, EXTRA_SEED, BLEND_SEED, FRESH_SEED, ODS_SEED = 100, 200, 123, 7, 11
FILL_STEPS = 20
ONTO_RATE = 0.5
ONTO_DAMPING = 0.5
JACOBIAN_WEIGHT = 1.0


def loss_of(name: str):
    """The per-sample student loss ``name`` in place of the run's (``student-loss`` keeps its signature)."""
    def loss(student: Tensor, teacher: Tensor, kind: str, temperature: float = 1.0) -> Tensor:
        if name == "mse":
            centred = (student - student.mean(1, keepdim=True)) - (teacher - teacher.mean(1, keepdim=True))
            return centred.pow(2).mean(1)
        if name == "l1":
            return distillation_per_sample(student, teacher, "l1")
        if name.startswith("ls"):
            return distillation_per_sample(standardised(student), standardised(teacher), "kl", float(name[2:]))
        return distillation_per_sample(student, teacher, "kl", float(name[2:]))
    return loss


def standardised(logits: Tensor) -> Tensor:
    """Each row's logits as z-scores (Sun et al., CVPR 2024, logit standardisation)."""
    return centred(logits) / (logits.std(-1, keepdim=True) + 1e-7)


def balanced_chance(answers: Tensor) -> Tensor:
    """(N,) weights drawing every ensemble class (the answers' argmax) equally often: each sample's is one over the
    number of pool samples of its class (the ``balanced`` variant)."""
    top = answers.argmax(1)
    return (1.0 / torch.bincount(top, minlength=answers.shape[1]).clamp_min(1).float())[top]


class Refit:
    """The run's student trained afresh, as ``student-refit`` trains it, on images in [0, 1] and logits."""

    def __init__(self, config: RunConfig, spec: DatasetSpec) -> None:
        self.config, self.spec = config, spec
        total = config.epochs * config.steps_per_epoch * config.student_steps
        self.steps = max(1, round(max(config.student.refit, 1.0) * total))

    def __call__(self, images: Tensor, targets: Tensor, seed: int, loss: str = "", averages: bool = False,
                 gradients: Tensor | None = None, of: str = "log-probability", balanced: bool = False
                 ) -> tuple[nn.Module, dict[str, nn.Module]]:
        """``gradients``: the ensemble's unit input gradients per image (:func:`ensemble_gradients`), matched by the
        student's as well, of the quantity ``of`` names (the ``jacobian`` variants)."""
        torch.manual_seed(seed)
        student = build_model(self.config.student.model, num_classes=self.spec.num_classes,
                              channels=self.spec.channels, image_size=self.spec.image_size)
        trainer = StudentTrainer(student, self.spec, self.config.student, torch.device("cpu"), total_steps=self.steps)
        ema = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True) if averages else None
        swa = AveragedModel(student, use_buffers=True) if averages else None
        draw = torch.Generator().manual_seed(seed)
        chance = balanced_chance(targets) if balanced else None
        kept = student_module.distillation_per_sample
        if loss:
            student_module.distillation_per_sample = loss_of(loss)
        try:
            for step in range(self.steps):
                idx = (torch.randint(0, len(images), (self.config.batch_size,), generator=draw) if chance is None
                       else torch.multinomial(chance, self.config.batch_size, replacement=True, generator=draw))
                if gradients is None:
                    trainer.step(images[idx], targets[idx])
                else:
                    jacobian_step(trainer, images[idx], targets[idx], gradients[idx], JACOBIAN_WEIGHT, of)
                if ema is not None and swa is not None:
                    ema.update_parameters(student)
                    if step >= self.steps // 2:
                        swa.update_parameters(student)
        finally:
            student_module.distillation_per_sample = kept
        return student, ({"ema": ema.module, "swa": swa.module} if ema is not None and swa is not None else {})


def unit(g: Tensor) -> Tensor:
    """Each sample's gradient scaled to unit L2 norm."""
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


def centred(logits: Tensor) -> Tensor:
    """Logits less their mean over the classes (the last dimension)."""
    return logits - logits.mean(-1, keepdim=True)


def weighted_logits(rows: list[Tensor], weights: Tensor, directions: Tensor, num_classes: int) -> Tensor:
    """sum_k sum_i directions[i] . (w_k * centred(z_k(x_i))), each teacher's centred logits weighted by its class
    shares w_k (K, C) along a direction in the classes per input (N, C): the quantity whose input gradient a
    Backward with grad_logits w_k * d - mean(w_k * d) returns, no answer needed first."""
    return sum((weights[k][None, :] * directions * centred(r[:, :num_classes])).sum() for k, r in enumerate(rows))


def ensemble_gradients(teachers: list[nn.Module], weights: Tensor, has_unknown: Tensor, spec: DatasetSpec,
                       images: Tensor, classes: Tensor, of: str = "log-probability", batch: int = 512) -> Tensor:
    """Per image in [0, 1], the unit direction, in the normalised input space the student sees, of the gradient of
    ``of``: ``log-probability``, log p_ens(class | x) of the ensemble as :func:`gate_probe.combine` forms it (the
    coordinator needs each teacher's logits for the Backward's grad_logits: a Forward and a Backward each), or
    ``logits``, sum_k w[k, class] (z_k(x)[class] - mean_c z_k(x)[c]), each teacher's centred logit of the class
    weighted by its class share (grad_logits w[k, class] (onehot - 1/C) needs no answer: a Backward each)."""
    out = []
    for i in range(0, len(images), batch):
        x = spec.normalize(images[i:i + batch]).requires_grad_(True)
        asked = classes[i:i + batch]
        rows = [t(x) for t in teachers]
        if of == "logits":
            value = weighted_logits(rows, weights, F.one_hot(asked, spec.num_classes).to(weights.dtype),
                                    spec.num_classes)
        else:
            logp = combine(stacked(rows), weights, has_unknown, spec.num_classes)
            value = logp.gather(1, asked[:, None]).sum()
        grad, = torch.autograd.grad(value, x)
        out.append(unit(grad))
    return torch.cat(out)


def jacobian_step(trainer: StudentTrainer, images: Tensor, answers: Tensor, gradients: Tensor,
                  weight: float, of: str = "log-probability") -> float:
    """One refit step with the Jacobian-matching term beside the run's distillation loss (the student's own
    gradient of what :func:`ensemble_gradients` took ``of``); returns the term."""
    student, settings = trainer.student, trainer.settings
    if settings.shift:
        raise ValueError("the jacobian variant needs student-shift=0 (a shifted image's gradient is not the "
                         "stored one)")
    student.train()
    x = trainer.spec.normalize(images).requires_grad_(True)
    logits = student(x)
    loss = distillation_per_sample(logits, answers, settings.loss, settings.temperature).mean()
    classes = answers.argmax(1, keepdim=True)
    mine = centred(logits) if of == "logits" else F.log_softmax(logits, 1)
    own, = torch.autograd.grad(mine.gather(1, classes).sum(), x, create_graph=True)
    term = (unit(own) - gradients).pow(2).flatten(1).sum(1).mean()
    trainer.update(loss + weight * term)
    return float(term.detach())


def ods_step(variant: str) -> float | None:
    """The pixel step of an ``odsE`` variant (E/255), None for any other name."""
    if variant.startswith("ods") and variant[3:].replace(".", "", 1).isdigit() and float(variant[3:]) > 0:
        return float(variant[3:]) / 255
    return None


def ods_of(teachers: list[nn.Module], weights: Tensor, spec: DatasetSpec, images: Tensor, step: float, seed: int,
           batch: int = 512) -> Tensor:
    """Each image in [0, 1] moved by ``step`` along the sign of the input gradient of w . sum_k w[k] centred(z_k(x)),
    w uniform in [-1, 1]^C per image (output-diversified sampling on the class-share-weighted logits), clamped to
    [0, 1] and quantised like pool images."""
    draw = torch.Generator().manual_seed(seed)
    directions = torch.rand(len(images), spec.num_classes, generator=draw) * 2 - 1
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].clone().requires_grad_(True)
        z = spec.normalize(x)
        value = weighted_logits([t(z) for t in teachers], weights, directions[i:i + batch], spec.num_classes)
        grad, = torch.autograd.grad(value, x)
        moved = (images[i:i + batch] + step * grad.sign()).clamp(0, 1)
        out.append(torch.round(moved * 255) / 255)
    return torch.cat(out)


ONTO_KINDS = {"ontoeach": (True, False), "ontobb": (True, True), "ontohalf": (True, True),
              "ontoclasshalf": (True, True), "ontoclass": (True, True), "onto": (False, False)}
# (each, bb); ontohalf: BB steps damped by ONTO_DAMPING; ontoclass: one class's component of a density each;
# ontoclasshalf: both


BALANCED = "-balanced"  # an onto variant's suffix: its refit draws every class of the answers equally often
ONLY = "-only"  # an onto variant's suffix: its refit trains on the climbed images alone, not the pool beside them
# onto variants' suffixes: as many blends of climbed images again, of random pairs or each with one of the class its
# answer ranks second (blends_of), answered and trained on beside the pool and the climbed images
BLENDED, RUNNER_UP = "-blended", "-runnerup"
TWICE = "-twice"  # an onto variant's suffix: two copies of each pool image climb, each to another (teacher, class)
FRESH = "-fresh"  # an onto variant's suffix: fresh draws of the final generator climb, not the pool's copies
SUFFIXES = (BALANCED, ONLY, BLENDED, RUNNER_UP, TWICE, FRESH)


def onto_steps(variant: str) -> tuple[int, bool, bool] | None:
    """The steps of an ``ontoK``, ``ontoeachK``, ``ontobbK`` or ``ontohalfK`` variant (each with or without the
    suffix ``-balanced``), whether each image climbs one teacher's density (in turn) and whether its steps are
    Barzilai-Borwein's; None for any other name."""
    for suffix in SUFFIXES:
        variant = variant.removesuffix(suffix)
    for prefix, (each, bb) in ONTO_KINDS.items():
        rest = variant[len(prefix):]
        if variant.startswith(prefix) and rest.isdigit() and int(rest) > 0:
            return int(rest), each, bb
    return None


def onto_damping(variant: str) -> float:
    """The damping of an ``ontohalfK`` variant's BB steps (1 for the others)."""
    return ONTO_DAMPING if variant.startswith(("ontohalf", "ontoclasshalf")) else 1.0


def onto_by_class(variant: str) -> bool:
    """Whether an onto variant's images climb one component (one class) of a teacher's density each, the
    (teacher, component) pairs in turn (``ontoclassK``), rather than a teacher's whole density."""
    return variant.startswith("ontoclass")


def onto_balanced(variant: str) -> bool:
    """Whether an onto variant's refit draws the pool and the climbed images class-balanced (``balanced_chance``
    over the answers of both)."""
    return variant.endswith(BALANCED)


def onto_densities(teachers: list[nn.Module], records: Tensor, spec: DatasetSpec, images: Tensor, steps: int,
                   rate: float = ONTO_RATE, batch: int = 1024, each: bool = False, bb: bool = False,
                   damping: float = 1.0, by_class: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Each image in [0, 1] moved by ``steps`` gradient steps up log sum_k pi_k p_k(x), the teachers' densities
    (``WithDensity``) mixed by their ``records`` (the clients' pooled data), in the normalised input space the
    teachers see; each step ``rate`` x the smallest off-basis variance of any density (a component's residual shrinks
    by up to ``rate`` a step, its principal directions far less). Clamped to [0, 1] and quantised like pool images.
    With ``each``, image i climbs teacher i mod K's density alone (every client's data gets as many images, where
    the mixture's climb leaves each image to the density nearest it). Also each image's largest log-density per
    input value over the teachers, before and after. With ``bb`` the steps need no variance: each image's own
    Barzilai-Borwein steps, as ``student-refit-climb`` takes them from its Backwards alone
    (:func:`fedkd.coordinator.climb.climb`). With ``by_class`` (and ``bb``), image i climbs the i-th of the
    (teacher, component) pairs in turn: one class of one client's data (``GaussianDensity.components``)."""
    densities = [t.density for t in teachers]
    pairs = [(k, j) for k, d in enumerate(densities) for j in range(len(d.means))]
    step = rate * float(torch.stack([d.noise.min() for d in densities]).min())
    log_prior = (records.double() / records.sum()).log().float()

    def mixture(z: Tensor, chosen: Tensor | None = None) -> tuple[Tensor, Tensor]:
        per = torch.stack([d(z) for d in densities])  # (K, B) nats per value
        if chosen is not None:  # each image's own teacher
            return per.gather(0, chosen[None]).squeeze(0) * float(z[0].numel()), per.amax(0)
        return torch.logsumexp(per * per.new_tensor(float(z[0].numel())) + log_prior[:, None], 0), per.amax(0)

    out, before, after = [], [], []
    for i in range(0, len(images), batch):
        z = spec.normalize(images[i:i + batch]).clone()
        chosen = torch.arange(i, i + len(z)) % len(densities) if each else None

        def gradient(at: Tensor, chosen: Tensor | None = chosen) -> Tensor:
            at = at.detach().requires_grad_(True)
            return torch.autograd.grad(mixture(at, chosen)[0].sum(), at)[0]

        with torch.no_grad():
            before.append(mixture(z)[1])
        if bb and by_class:  # each image one class's component of one teacher's density
            which = torch.arange(i, i + len(z)) % len(pairs)
            for p, (k, j) in enumerate(pairs):
                mine = (which == p).nonzero().flatten()

                def component(at: Tensor, k: int = k, j: int = j) -> Tensor:
                    at = at.detach().requires_grad_(True)
                    return torch.autograd.grad(densities[k].components(at)[j].sum(), at)[0]
                if len(mine):
                    z[mine] = climb(z[mine], component, steps, damping)[0]
        elif bb:  # the coordinator's own steps (student-refit-climb)
            z = climb(z, gradient, steps, damping)[0]
        for _ in range(0 if bb else steps):
            z = z + step * gradient(z)
        x = torch.round(spec.denormalize(z).clamp(0, 1) * 255) / 255
        with torch.no_grad():
            after.append(mixture(spec.normalize(x))[1])
        out.append(x)
    return torch.cat(out), torch.cat(before), torch.cat(after)


def drawn_from_densities(teachers: list[nn.Module], spec: DatasetSpec, count: int, seed: int) -> Tensor:
    """``count`` images in [0, 1] (quantised like pool images) drawn from the teachers' densities
    (``WithDensity``): image i from the i-th of the (teacher, component) pairs in turn, a probabilistic-PCA draw of
    that component (its mean, plus each principal direction times the square root of its variance times a standard
    normal draw, plus isotropic noise of the variance off them), in the normalised space the teachers see."""
    densities = [t.density for t in teachers]
    pairs = [(d, j) for d in densities for j in range(len(d.means))]
    g = torch.Generator().manual_seed(seed)
    which = torch.arange(count) % len(pairs)
    out = torch.empty(count, *spec.input_shape)
    for p, (density, j) in enumerate(pairs):
        mine = (which == p).nonzero().flatten()
        if not len(mine):
            continue
        flat = density.draw_component(j, len(mine), g)
        out[mine] = spec.denormalize(flat.view(len(mine), *spec.input_shape))
    return torch.round(out.clamp(0, 1) * 255) / 255


def thin_classes(answers: Tensor, share: float = 0.5) -> dict[int, int]:
    """Per class the pool holds fewer samples of (by the stored answers' argmax) than ``share`` of a balanced
    pool's, how many more would bring it there."""
    n, c = answers.shape
    floor = int(share * n / c)
    counts = torch.bincount(answers.argmax(1), minlength=c)
    return {k: floor - int(counts[k]) for k in range(c) if counts[k] < floor}


def fill_real(split: Any, need: dict[int, int], seed: int) -> Tensor:
    """For each thin class, that many of the task's own training images of the class (an oracle: the coordinator
    holds none)."""
    draw = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split.train.labels), generator=draw)
    labels = split.train.labels[order]
    return torch.cat([split.train.images[order[labels == k][:n]] for k, n in need.items()]
                     + [split.train.images[:0]])  # nothing thin: no image


def fill_synthetic(teachers: list[nn.Module], weights: Tensor, has_unknown: Tensor, spec: DatasetSpec,
                   images: Tensor, stored: Tensor, need: dict[int, int], steps: int, lr: float = 0.02,
                   bn_weight: float = 0.1, batch: int = 256) -> Tensor:
    """For each thin class k, the pool images the ensemble gives the highest p(k) (cycled where too few), moved by
    ``steps`` Adam steps on the pixels towards the class: CE(ensemble(x), k) plus ``bn_weight`` times the teachers'
    BatchNorm-statistics distance (each a Forward and a Backward per step and teacher); quantised like the pool."""
    statistics = [FeatureStatistics(t) for t in teachers]  # DeepInversion's term, as a teacher computes it
    logp_pool = F.log_softmax(stored, 1)
    out = [images[:0]]  # nothing thin: no image
    try:
        for k, n in need.items():
            ranked = logp_pool[:, k].argsort(descending=True)
            start = images[ranked[torch.arange(n) % len(ranked)]]
            for i in range(0, n, batch):
                x = start[i:i + batch].clone().requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                target = torch.full((len(x),), k)
                for _ in range(steps):
                    z = spec.normalize(x.clamp(0, 1))
                    rows, moments = [], []
                    for t, term in zip(teachers, statistics):
                        term.begin()
                        rows.append(t(z))
                        moments.append(term.end())
                    logp = combine(stacked(rows), weights, has_unknown, spec.num_classes)
                    loss = F.nll_loss(logp, target) + bn_weight * torch.stack(moments).sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                out.append(torch.round(x.detach().clamp(0, 1) * 255) / 255)
    finally:
        for term in statistics:
            term.remove()
    return torch.cat(out)


def runner_up_partners(first: Tensor, answers: Tensor, generator: torch.Generator) -> Tensor:
    """A partner for each pool sample ``first`` (indices into ``answers``, the pool's (N, C) answers): a random
    sample of the class the answer of ``first`` ranks second, by the answers' argmax; a random sample where the pool
    holds none of that class."""
    top = answers.argmax(1)
    runner_up = answers[first].scatter(1, top[first].unsqueeze(1), -torch.inf).argmax(1)
    second = torch.randint(0, len(answers), (len(first),), generator=generator)
    for k in range(answers.shape[1]):
        members, mine = (top == k).nonzero().flatten(), runner_up == k
        if len(members) and bool(mine.any()):
            second[mine] = members[torch.randint(0, len(members), (int(mine.sum()),), generator=generator)]
    return second


def blends_of(images: Tensor, seed: int, stored: Tensor | None = None) -> Tensor:
    """As many blends of pool pairs as the pool holds, a uniform weight each, quantised like pool images. Each pair's
    first image is drawn at random, its second too or, given the pool's ``stored`` answers, of the class the first
    one's answer ranks second (:func:`runner_up_partners`): blends across the boundaries the ensemble itself finds
    closest (shirts against T-shirts, pullovers and coats on Fashion-MNIST), where random pairs mostly join classes
    the ensemble never confuses."""
    draw = torch.Generator().manual_seed(seed)
    n = len(images)
    first = torch.randint(0, n, (n,), generator=draw)
    second = (torch.randint(0, n, (n,), generator=draw) if stored is None
              else runner_up_partners(first, stored, draw))
    w = torch.rand(n, 1, 1, 1, generator=draw)
    return torch.round((w * images[first] + (1 - w) * images[second]) * 255) / 255


def fresh_of(run_state: dict[str, Any], config: RunConfig, spec: DatasetSpec, count: int, seed: int,
             answer: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """``count`` samples of the run's final generator (the run's synthesizer restored, drawing as it drew its
    Forward-only batches: batch statistics, the run's shift, quantised) and ``answer``'s logits for them."""
    synthesizer = Synthesizer(spec, config.synthesis, config.batch_size, torch.device("cpu"))
    synthesizer.load_state_dict(run_state["method"]["synthesizer"])
    torch.manual_seed(seed)
    batches = [synthesizer.draw(answer) for _ in range(math.ceil(count / config.batch_size))]
    return torch.cat([b.images for b in batches])[:count], torch.cat([b.answers for b in batches])[:count]


def with_density_rank(teachers: list[nn.Module], config: RunConfig, split: Any, rank: int) -> list[nn.Module]:
    """The teachers with each density fitted again at ``rank`` principal directions a class on its client's share
    of ``split``'s training images (:func:`density_of`, as ``config`` partitions them; the classifiers unchanged):
    what the climb would do with another rank, which the clients choose (``DEFAULT_RANK``). Experiment-only: the
    probe knows every client's data."""
    if rank < 0:
        raise ValueError(f"a density's rank must be >= 0, got {rank}")
    if not all(isinstance(t, WithDensity) for t in teachers):
        raise SystemExit("--density-rank: the run's teachers do not all answer a density (teacher-density=on)")
    shares = client_partitions(config, split.train.labels)
    if len(shares) != len(teachers):
        raise SystemExit(f"--density-rank: {len(teachers)} teachers but the run's split makes {len(shares)} shares")
    return [WithDensity(teacher.classifier, density_of(split.train.subset(share), split.spec, rank=rank)).eval()
            for teacher, share in zip(teachers, shares, strict=True)]


def refit_probe(run: Path, variants: list[str], students: int = 3, pool_seed: int = POOL_SEED,
                on_row: Callable[[dict[str, Any]], None] | None = None,
                extra_seed: int = EXTRA_SEED, refit_share: float | None = None,
                density_rank: int | None = None) -> list[dict[str, Any]]:
    """The rows of ``variants`` on ``run``'s final pool; ``on_row`` sees each as soon as it is measured.
    ``refit_share``: the refit's steps as this share of the run's student steps instead of the run's
    ``student-refit``; ``density_rank``: each teacher's density fitted again at this rank on its client's share
    of the split (:func:`with_density_rank`) instead of the run's."""
    saved = {k: v for k, v in json.loads((run / "config.json").read_text()).items() if v is not None}
    if refit_share is not None:
        saved["student-refit"] = refit_share
    config = config_from_mapping(saved)
    split = load_dataset(config.dataset, config.data_root, seed=config.seed)
    spec, test = split.spec, split.test
    c = spec.num_classes
    state = torch.load(run / "checkpoint.pt", weights_only=False, map_location="cpu")
    pool = state["method"]["pool"]
    images, stored = pool["images"].float() / 255, pool["answers"].float()
    teachers, weights, has_unknown = run_teachers(run, c)
    if density_rank is not None:
        teachers = with_density_rank(teachers, config, split, density_rank)
    has_density, sharpness = density_weighed(run, teachers)
    refit = Refit(config, spec)
    test_x = spec.normalize(test.images)

    held = torch.bincount(test.labels, minlength=c)  # test images per class

    def hits(model: nn.Module) -> Tensor:
        return predict(model, test_x, device="cpu").argmax(1) == test.labels

    def accuracy(model: nn.Module) -> float:
        return float(hits(model).float().mean())

    def teachers_on(x: Tensor) -> Tensor:
        return combine(answers(teachers, spec.normalize(x)), weights, has_unknown, c, has_density=has_density,
                       sharpness=sharpness)  # (N, C) log-probabilities, gated as the run gated

    rows: list[dict[str, Any]] = []

    def row(variant: str, samples: int, model: nn.Module, **extra: Any) -> None:
        hit = hits(model)
        recall = torch.bincount(test.labels[hit], minlength=c) / held.clamp_min(1)  # a class with no image: 0
        rows.append({"run": run.name, "variant": variant, "samples": samples, "steps": refit.steps,
                     "student": float(hit.float().mean()), "recall": [round(float(r), 3) for r in recall], **extra})
        if on_row is not None:
            on_row(rows[-1])

    fitted: list[nn.Module] = []
    if "pool" in variants or "surrogate" in variants:
        first, averaged = refit(images, stored, pool_seed, averages=True)
        fitted.append(first)
        row("pool", len(images), first)
        for name, model in averaged.items():
            row(name, len(images), model)
    if "balanced" in variants:
        row("balanced", len(images), refit(images, stored, pool_seed, balanced=True)[0])
    for name in (v for v in variants if v in ("l1", "mse") or v.startswith(("kl", "ls"))):
        row(name, len(images), refit(images, stored, pool_seed, loss=name)[0])
    blends = (blends_of(images, BLEND_SEED) if {"blends", "surrogate"} & set(variants)
              or ({"fill", "fill-real"} & set(variants) and config.student.refit_mixup > 0) else None)
    answered = teachers_on(blends) if blends is not None else None
    if "blends" in variants and blends is not None and answered is not None:
        row("blends", 2 * len(images), refit(torch.cat([images, blends]), torch.cat([stored, answered]),
                                             extra_seed)[0], extra_query_samples=len(blends) * len(teachers))
    if "blends-runner-up" in variants:
        close = blends_of(images, BLEND_SEED, stored)
        asked = teachers_on(close)
        row("blends-runner-up", 2 * len(images), refit(torch.cat([images, close]), torch.cat([stored, asked]),
                                                       extra_seed)[0], extra_query_samples=len(close) * len(teachers),
            classes=torch.bincount(asked.argmax(1), minlength=c).tolist())
    if "surrogate" in variants and blends is not None and answered is not None:
        for k in range(1, students):
            fitted.append(refit(images, stored, pool_seed + k)[0])
        with torch.no_grad():
            def mean_probs(x: Tensor) -> Tensor:
                return torch.stack([F.softmax(predict(m, spec.normalize(x), device="cpu"), 1) for m in fitted]).mean(0)
            labels = mean_probs(blends).clamp_min(1e-8).log()
            together = float((mean_probs(test.images).argmax(1) == test.labels).float().mean())
        each = [accuracy(m) for m in fitted]
        row("surrogate", 2 * len(images), refit(torch.cat([images, blends]), torch.cat([stored, labels]),
                                                extra_seed)[0],
            extra_query_samples=0, students=each, students_ensemble=together,
            agreement_with_teachers=float((labels.argmax(1) == answered.argmax(1)).float().mean()))
    if "fresh" in variants:
        fresh, answered_fresh = fresh_of(state, config, spec, len(images), FRESH_SEED,
                                         lambda x: combine(answers(teachers, x), weights, has_unknown, c))
        row("fresh", 2 * len(images), refit(torch.cat([images, fresh]), torch.cat([stored, answered_fresh]),
                                            extra_seed)[0], extra_query_samples=len(fresh) * len(teachers),
            mean_top_probability=float(answered_fresh.exp().amax(1).mean()),
            pool_mean_top_probability=float(F.softmax(stored, 1).amax(1).mean()))
    if "flips" in variants or "flipsq" in variants:
        mirrored = images.flip(-1)
        if "flips" in variants:
            row("flips", 2 * len(images), refit(torch.cat([images, mirrored]), torch.cat([stored, stored]),
                                                extra_seed)[0], extra_query_samples=0)
        if "flipsq" in variants:
            asked = teachers_on(mirrored)
            row("flipsq", 2 * len(images), refit(torch.cat([images, mirrored]), torch.cat([stored, asked]),
                                                 extra_seed)[0], extra_query_samples=len(mirrored) * len(teachers),
                agreement_with_stored=float((asked.argmax(1) == stored.argmax(1)).float().mean()))
    for variant in variants:
        step = ods_step(variant)
        if step is not None:
            moved = ods_of(teachers, weights, spec, images, step, ODS_SEED)
            asked = teachers_on(moved)
            row(variant, 2 * len(images), refit(torch.cat([images, moved]), torch.cat([stored, asked]),
                                                extra_seed)[0], extra_query_samples=2 * len(moved) * len(teachers),
                agreement_with_stored=float((asked.argmax(1) == stored.argmax(1)).float().mean()),
                mean_pixel_change=float((moved - images).abs().mean()))
    for variant in variants:
        onto = onto_steps(variant)
        if onto is not None:
            steps, each, bb = onto
            if not all(isinstance(t, WithDensity) for t in teachers):
                raise SystemExit(f"{variant}: {run}'s teachers do not all answer a density (teacher-density=on)")
            records = torch.tensor([float(sum(counts)) for counts in records_of(run)])
            records = records if bool((records > 0).all()) else torch.ones(len(teachers))  # none shared: even
            copies = images
            if variant.endswith(FRESH):  # the generator's fresh draws in place of the pool's copies, unanswered
                # until they have climbed (answering them is no draw's random stream: the same images either way)
                copies = fresh_of(state, config, spec, len(images), FRESH_SEED, lambda x: x.new_zeros(len(x), c))[0]
            copies = torch.cat([copies, copies]) if variant.endswith(TWICE) else copies  # the second copy of
            # image i is image N + i: the (N + i)-th (teacher, class) pair, another than the first copy's
            moved, before, after = onto_densities(teachers, records, spec, copies, steps, each=each, bb=bb,
                                                  damping=onto_damping(variant), by_class=onto_by_class(variant))
            asked = teachers_on(moved)
            only = variant.endswith(ONLY)
            train_x, train_y = (moved, asked) if only else (torch.cat([images, moved]), torch.cat([stored, asked]))
            mixed = None
            if variant.endswith((BLENDED, RUNNER_UP)):  # blends of the climbed images, answered, trained on too
                mixed = blends_of(moved, BLEND_SEED, asked if variant.endswith(RUNNER_UP) else None)
                train_x, train_y = torch.cat([train_x, mixed]), torch.cat([train_y, teachers_on(mixed)])
            row(variant, len(train_x), refit(train_x, train_y, extra_seed, balanced=onto_balanced(variant))[0],
                # a step: a Forward and a Backward of the one teacher climbed (each: a teacher answers a Backward
                # only for inputs it has answered), or of every teacher (the mixture's posterior needs every
                # density); then a Forward of each moved image by every teacher
                extra_query_samples=2 * steps * (1 if each else len(teachers)) * len(moved)
                + (len(moved) + (len(mixed) if mixed is not None else 0)) * len(teachers),
                agreement_with_stored=None if variant.endswith(FRESH) else float(  # (fresh draws: no stored answer)
                    (asked.argmax(1) == stored.repeat(len(moved) // len(stored), 1).argmax(1)).float().mean()),
                mean_pixel_change=float((moved - copies).abs().mean()),
                log_density_before=float(before.median()), log_density_after=float(after.median()),
                test_log_density=float(torch.stack([t.density(test_x) for t in teachers]).amax(0).median()),
                classes=torch.bincount(asked.argmax(1), minlength=c).tolist())
    if "drawn" in variants:
        if not all(isinstance(t, WithDensity) for t in teachers):
            raise SystemExit(f"drawn: {run}'s teachers do not all answer a density (teacher-density=on)")
        drawn = drawn_from_densities(teachers, spec, len(images), FRESH_SEED)
        asked = teachers_on(drawn)
        row("drawn", 2 * len(images), refit(torch.cat([images, drawn]), torch.cat([stored, asked]), extra_seed)[0],
            extra_query_samples=len(drawn) * len(teachers),  # a Forward of each drawn image by every teacher
            test_log_density=float(torch.stack([t.density(test_x) for t in teachers]).amax(0).median()),
            log_density_after=float(torch.stack([t.density(spec.normalize(drawn)) for t in teachers])
                                    .amax(0).median()),
            classes=torch.bincount(asked.argmax(1), minlength=c).tolist())
    if "fill" in variants or "fill-real" in variants:
        need = thin_classes(stored)
        asked_for = torch.repeat_interleave(torch.tensor(list(need), dtype=torch.long),
                                            torch.tensor(list(need.values()), dtype=torch.long))  # each fill's class
        base_x, base_y = images, stored
        if blends is not None and answered is not None:  # the run's own recipe beside: the pool and its blends
            base_x, base_y = torch.cat([images, blends]), torch.cat([stored, answered])
        for variant in ("fill-real", "fill"):
            if variant not in variants:
                continue
            extra = (fill_real(split, need, FRESH_SEED) if variant == "fill-real" else
                     fill_synthetic(teachers, weights, has_unknown, spec, images, stored, need, FILL_STEPS))
            asked = teachers_on(extra) if len(extra) else stored[:0]
            row(variant, len(base_x) + len(extra), refit(torch.cat([base_x, extra]), torch.cat([base_y, asked]),
                                                         extra_seed)[0],
                extra_query_samples=len(extra) * len(teachers) * (1 if variant == "fill-real" else 1 + 2 * FILL_STEPS),
                filled={str(k): n for k, n in need.items()},
                fill_calls_its_class=float((asked.argmax(1) == asked_for).float().mean()) if len(extra) else 1.0,
                fill_mean_top_probability=float(asked.exp().amax(1).mean()) if len(extra) else 0.0)
    if "proxy" in variants:
        digits = load_dataset("mnist5k", seed=0)
        proxy = torch.cat([digits.train.images, digits.test.images])
        if proxy.shape[2:] != images.shape[2:]:  # another task's size: resized as the run's images are shaped
            proxy = F.interpolate(proxy, size=tuple(images.shape[2:]), mode="area")
        proxy = proxy.expand(-1, images.shape[1], -1, -1).contiguous()  # grey to the run's channels
        asked = teachers_on(proxy)
        row("proxy", len(images) + len(proxy), refit(torch.cat([images, proxy]), torch.cat([stored, asked]),
                                                     extra_seed)[0], extra_query_samples=len(proxy) * len(teachers),
            proxy_mean_top_probability=float(asked.exp().amax(1).mean()),
            proxy_classes=torch.bincount(asked.argmax(1), minlength=c).tolist())
    for variant, of, asks in (("jacobian", "log-probability", 2), ("jacobian-logits", "logits", 1)):
        if variant in variants:
            gradients = ensemble_gradients(teachers, weights, has_unknown, spec, images, stored.argmax(1), of)
            row(variant, len(images), refit(images, stored, pool_seed, gradients=gradients, of=of)[0],
                extra_query_samples=asks * len(images) * len(teachers))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--variants", default="pool,blends,surrogate,fresh",
                        help=f"comma-separated, of {', '.join(VARIANTS)} (klT and lsT for any temperature T, "
                             "odsE for an output-diversified step of E/255, ontoK, ontoeachK, ontobbK, ontohalfK or "
                             "ontoclassK for K steps up the densities)")
    parser.add_argument("--students", type=int, default=3, help="students in the surrogate's ensemble (>= 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refit-seed", type=int, default=POOL_SEED,
                        help="the random stream of the refits on the pool alone and of jacobian's "
                             "(default %(default)s)")
    parser.add_argument("--extra-seed", type=int, default=EXTRA_SEED,
                        help="the random stream of the refits with extra samples (default %(default)s)")
    parser.add_argument("--density-rank", type=int, default=None,
                        help="fit each teacher's density again at this rank on its client's share (default: the "
                             "run's densities, rank 30)")
    parser.add_argument("--refit-share", type=float, default=None,
                        help="the refit's steps as this share of the run's student steps (default: the run's "
                             "student-refit)")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        at_temperature = v.startswith(("kl", "ls")) and v[2:].replace(".", "", 1).isdigit()
        if v not in VARIANTS and not at_temperature and ods_step(v) is None and onto_steps(v) is None:
            parser.error(f"unknown variant {v!r}: {', '.join(VARIANTS)}, klT, lsT, odsE, ontoK, ontoeachK, "
                         "ontobbK, ontohalfK or ontoclassK")
    if args.students < 1:
        parser.error("--students must be at least 1")
    for run in args.runs:
        if not (run / "checkpoint.pt").is_file() or not (run / "clients").is_dir():
            parser.error(f"{run} is not a finished run directory (checkpoint.pt and clients/ are needed)")
    torch.set_num_threads(args.threads)
    print("| run | variant | samples | student | more |")
    print("|---|---|---|---|---|")
    def show(r: dict[str, Any]) -> None:
        more = {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, list)
                    else v) for k, v in r.items() if k not in ("run", "variant", "samples", "student", "steps")}
        print(f"| {r['run']} | {r['variant']} | {r['samples']:,} | {r['student']:.4f} | "
              f"{json.dumps(more) if more else ''} |", flush=True)

    for run in args.runs:
        refit_probe(run, variants, args.students, args.refit_seed, on_row=show, extra_seed=args.extra_seed,
                    refit_share=args.refit_share, density_rank=args.density_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
