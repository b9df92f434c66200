"""The institution's entry points: the teacher agent that dials the coordinator's hub
(:mod:`client.agent`, ``fedkd teacher``) and, with the Flower app, the ClientApp.

In a one-machine in-process run (``fedkd run``) the client side is played by
:mod:`fedkd.experiment`, which trains each client's teacher on its own
partition and serves it through a :class:`fedkd.teacher.TeacherHost`.
"""
