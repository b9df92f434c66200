"""The institution's entry points (Flower ClientApp, the teacher agent that dials the hub).

They arrive with the gRPC and Flower transports; in a one-machine run
(``fedkd run``) the client side is played by :mod:`fedkd.experiment`, which
trains each client's teacher on its own partition and serves it through a
:class:`fedkd.teacher.TeacherHost`.
"""
