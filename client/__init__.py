"""The institution's entry points: the teacher agent that dials the coordinator's hub
(:mod:`fedkd.client.agent`, ``fedkd teacher``) and, with the Flower app, the ClientApp.

The teacher recipe both use (partitions, training, DP-SGD and PATE) is
:mod:`fedkd.institution.training`; the client side never imports the coordinator's
driver. In a one-machine in-process run (``fedkd run``) the coordinator's
:mod:`fedkd.coordinator.experiment` plays the clients with that same recipe and serves
each teacher through a :class:`fedkd.institution.host.TeacherHost`.
"""
