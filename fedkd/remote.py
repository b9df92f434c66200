"""A teacher behind the query contract, made to behave like a local module.

:class:`RemoteTeacher` wraps any :class:`TeacherEndpoint` (the in-process
:class:`~fedkd.teacher.TeacherHost`, or a gRPC stub) in one autograd function:
Forward sends the inputs, and ``loss.backward()`` sends a Backward call with
the gradient of the loss w.r.t. the returned outputs, receiving the gradient
w.r.t. the inputs. Method code never sees the teacher's weights.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from fedkd.teacher import CurriculumState, ForwardReply, TeacherDescription


class TeacherEndpoint(Protocol):
    """The query contract as seen from the coordinator."""

    def describe(self) -> TeacherDescription: ...

    def forward(self, inputs: Tensor, state: CurriculumState, *, bn_loss: bool = False) -> ForwardReply: ...

    def backward(self, inputs: Tensor, grad_logits: Tensor, state: CurriculumState, *,
                 grad_bn_loss: float | None = None) -> Tensor: ...


class _Query(torch.autograd.Function):
    """(inputs) -> (logits, bn_loss); backward is the endpoint's Backward call."""

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, endpoint: TeacherEndpoint, state: CurriculumState,
                bn_loss: bool) -> tuple[Tensor, Tensor]:
        reply = endpoint.forward(inputs.detach().cpu().float().contiguous(), state, bn_loss=bn_loss)
        ctx.endpoint, ctx.state, ctx.bn_loss, ctx.device = endpoint, state, bn_loss, inputs.device
        ctx.save_for_backward(inputs)
        loss = reply.bn_loss if reply.bn_loss is not None else torch.zeros(())
        return reply.logits.to(inputs.device), loss.to(inputs.device)

    @staticmethod
    def backward(ctx: Any, grad_logits: Tensor, grad_loss: Tensor) -> tuple[Tensor | None, None, None, None]:
        (inputs,) = ctx.saved_tensors
        grad_inputs = ctx.endpoint.backward(
            inputs.detach().cpu().float().contiguous(),
            grad_logits.detach().cpu().float().contiguous(),
            ctx.state,
            grad_bn_loss=float(grad_loss) if ctx.bn_loss else None,
        )
        return grad_inputs.to(ctx.device), None, None, None


class RemoteTeacher:
    """Call it like a module: ``logits, bn_loss = teacher(x, state, bn_loss=True)``.

    When ``x`` requires grad, gradients flow back through the endpoint's
    Backward call; otherwise only Forward is sent.
    """

    def __init__(self, endpoint: TeacherEndpoint) -> None:
        self.endpoint = endpoint
        self.description = endpoint.describe()

    @property
    def has_feature_statistics(self) -> bool:
        return self.description.has_feature_statistics

    def __call__(
        self, inputs: Tensor, state: CurriculumState, *, bn_loss: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        want = bn_loss and self.has_feature_statistics
        if inputs.requires_grad and torch.is_grad_enabled():
            logits, loss = _Query.apply(inputs, self.endpoint, state, want)
        else:
            reply = self.endpoint.forward(inputs.detach().cpu().float().contiguous(), state, bn_loss=want)
            logits = reply.logits.to(inputs.device)
            loss = torch.zeros((), device=inputs.device) if reply.bn_loss is None else reply.bn_loss.to(inputs.device)
        return logits, (loss if want else None)
