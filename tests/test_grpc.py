"""The gRPC query path with real servers on 127.0.0.1: hub, agents (threads and processes), TLS, tokens, fuzzing."""

import dataclasses
import random
import threading
import time

import grpc
import pytest
import torch
from fedkd.client.agent import AgentError, AgentSettings, ClientTLS, SessionAborted, TeacherAgent
from fedkd.server.credentials import ServerTLS
from fedkd.server.hub import Hub
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fedkd.codec import encode_description, encode_tensor
from fedkd.contract import FEATURE_STATISTICS, QueryContext, TeacherDescription
from fedkd.coordinator.ensemble import Ensemble
from fedkd.coordinator.pool import LocalPool, QuorumError
from fedkd.institution.host import TeacherHost
from fedkd.models import build_model
from fedkd.tls import make_dev_pki
from fedkd.v1 import fedkd_pb2 as pb
from fedkd.v1 import fedkd_pb2_grpc as pb_grpc

STATE = QueryContext.of(epoch=1, step=7, lam=0.5, adv_weight=0.25)
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"), clients=["teacher-000", "teacher-001", "intruder"])


def server_tls(pki, mutual=False):
    return ServerTLS(pki.server_cert.read_bytes(), pki.server_key.read_bytes(),
                     pki.ca_cert.read_bytes() if mutual else None)


def client_tls(pki, name=None):
    if name is None:
        return ClientTLS(pki.ca_cert.read_bytes())
    cert, key = pki.clients[name]
    return ClientTLS(pki.ca_cert.read_bytes(), cert.read_bytes(), key.read_bytes())


def make_host(seed, max_batch=256, unknown_output=False):
    torch.manual_seed(seed)
    model = build_model("lenet5-half", num_classes=10 + int(unknown_output), channels=1, image_size=8)
    model.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(3):
            model(torch.randn(32, *SHAPE) * (1 + seed))
    desc = TeacherDescription(client=seed, model="lenet5-half", num_classes=10, input_shape=SHAPE, mean=(0.5,),
                              std=(0.25,), has_feature_statistics=True, num_samples=100,
                              label_counts=tuple(range(1, 11)), terms=("feature-statistics", "activation"),
                              unknown_output=unknown_output)
    return TeacherHost(model.eval(), desc, max_batch=max_batch)


RUNNING = []


@pytest.fixture(autouse=True)
def stop_agents():
    yield
    while RUNNING:
        running = RUNNING.pop()
        running.agent.stop()
        running.thread.join(10)


class Running:
    """An agent serving in a thread; ``result`` holds what serve() returned or raised. Stopped after each test."""

    def __init__(self, host, port, *, token=None, tls=None, **settings):
        RUNNING.append(self)
        self.agent = TeacherAgent(host, AgentSettings(target=f"localhost:{port}", token=token, tls=tls,
                                                      initial_backoff=0.05, max_backoff=0.2, **settings))
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.result = self.agent.serve()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            self.result = exc

    def join(self, timeout=10):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not stop"
        return self.result


@pytest.fixture
def hub_factory():
    hubs = []

    def make(slots, **kwargs):
        kwargs.setdefault("session", "test-run")
        hub = Hub(slots, **kwargs)
        hub.start()
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.stop()


def two_teacher_hub(hub_factory, pki, **kwargs):
    hub = hub_factory({"teacher-000": "token-zero", "teacher-001": "token-one"}, tls=server_tls(pki), **kwargs)
    hosts = [make_host(0), make_host(1)]
    agents = [Running(h, hub.port, token=t, tls=client_tls(pki)) for h, t in zip(hosts, ["token-zero", "token-one"])]
    hub.wait_for_teachers(timeout=20)
    return hub, hosts, agents


def test_queries_over_tls_match_the_in_process_teachers(hub_factory, pki):
    hub, hosts, agents = two_teacher_hub(hub_factory, pki)
    # The query path alone: reliability=False, so no gradient-consistency check adds a Forward to the count
    remote = Ensemble(hub.pool, "class-weighted", reliability=False)
    local = Ensemble(LocalPool([make_host(0), make_host(1)]), "class-weighted", reliability=False)
    x = torch.randn(16, *SHAPE)
    xr, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_r, out_l = remote(xr, STATE, terms=(FEATURE_STATISTICS,)), local(xl, STATE, terms=(FEATURE_STATISTICS,))
    torch.testing.assert_close(out_r.logits, out_l.logits, rtol=0, atol=0)
    torch.testing.assert_close(out_r.terms[FEATURE_STATISTICS], out_l.terms[FEATURE_STATISTICS], rtol=0, atol=0)
    (out_r.logits.square().sum() + out_r.terms[FEATURE_STATISTICS]).backward()
    (out_l.logits.square().sum() + out_l.terms[FEATURE_STATISTICS]).backward()
    torch.testing.assert_close(xr.grad, xl.grad, rtol=1e-6, atol=1e-7)
    # Every query carried the curriculum state; every teacher accounted for what it released.
    assert all(h.last_state == STATE for h in hosts)
    for stats in hub.pool.stats():
        assert (stats.forward_calls, stats.backward_calls, stats.samples, stats.missed) == (1, 1, 32, 0)
        assert stats.bytes > 0 and stats.wire_bytes > stats.bytes
    reports = hub.end_session()
    assert [r["forward_calls"] for r in reports] == [1, 1]
    assert [r["samples"] for r in reports] == [32, 32]
    assert all(a.join()["backward_calls"] == 1 for a in agents)
    # The Backward named its Forward: the inputs travelled once (both ledgers count them once)
    inputs, logits, grads = 16 * 64 * 4, 16 * 10 * 4, 16 * 64 * 4
    assert [s.bytes for s in hub.pool.stats()] == [inputs + logits + 4 + logits + grads] * 2
    assert [r["bytes"] for r in reports] == [inputs + logits + 4 + logits + grads] * 2


def test_an_open_set_teacher_beside_a_closed_one_over_grpc_matches_in_process(hub_factory, pki):
    hub = hub_factory({"teacher-000": "token-zero", "teacher-001": "token-one"}, tls=server_tls(pki))
    hosts = [make_host(0, unknown_output=True), make_host(1)]
    agents = [Running(h, hub.port, token=t, tls=client_tls(pki)) for h, t in zip(hosts, ["token-zero", "token-one"])]
    hub.wait_for_teachers(timeout=20)
    assert [d.unknown_output for d in hub.pool.descriptions] == [True, False]
    remote = Ensemble(hub.pool, "class-weighted", reliability=False)
    local = Ensemble(LocalPool([make_host(0, unknown_output=True), make_host(1)]), "class-weighted",
                     reliability=False)
    x = torch.randn(8, *SHAPE)
    xr, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_r, out_l = remote(xr, STATE), local(xl, STATE)
    torch.testing.assert_close(out_r.logits, out_l.logits, rtol=0, atol=0)
    assert out_r.logits.shape == (8, 10)
    out_r.logits.square().sum().backward()
    out_l.logits.square().sum().backward()
    torch.testing.assert_close(xr.grad, xl.grad, rtol=1e-6, atol=1e-7)
    hub.end_session()
    assert all(a.join()["backward_calls"] == 1 for a in agents)


def make_density_host(seed, raised=0.0):
    """A teacher with a density of its own images (teacher-density=on); ``raised``: nats per value added to it
    (a claim on every input)."""
    from fedkd.institution.density import WithDensity, fit_density

    host = make_host(seed)
    g = torch.Generator().manual_seed(seed)
    images = 0.5 * torch.randn(200, *SHAPE, generator=g) + seed
    density = fit_density(images, torch.arange(200) % 10, 10, rank=3)
    density.log_prior += raised * density.dims
    desc = dataclasses.replace(host.description, log_density_output=True, draws_density=True)
    return TeacherHost(WithDensity(host.model, density), desc)


def test_teachers_with_densities_over_grpc_match_in_process_and_a_claimant_is_refuted_over_the_wire(
        hub_factory, pki):
    """The density gate and its check over TLS: the answers' extra column travels, the check's probes are one
    Forward to each density teacher (counted by the hub and by the teachers), the raised density is refuted."""
    tokens = {f"teacher-00{k}": f"token-{k}" for k in range(3)}
    hub = hub_factory(tokens, tls=server_tls(pki))
    hosts = [make_density_host(0), make_density_host(1), make_density_host(2, raised=10.0)]
    agents = [Running(h, hub.port, token=t, tls=client_tls(pki)) for h, t in zip(hosts, tokens.values())]
    hub.wait_for_teachers(timeout=20)
    assert [d.log_density_output for d in hub.pool.descriptions] == [True] * 3
    # (every teacher holds every class: density-gate=auto would not weigh by the densities, nor ask for them)
    remote = Ensemble(hub.pool, "class-weighted", density_gate="on")
    local = Ensemble(LocalPool([make_density_host(0), make_density_host(1), make_density_host(2, raised=10.0)]),
                     "class-weighted", density_gate="on")
    x = torch.randn(8, *SHAPE)
    out_r, out_l = remote(x, STATE), local(x, STATE)
    torch.testing.assert_close(out_r.logits, out_l.logits, rtol=0, atol=0)
    torch.testing.assert_close(out_r.competence, out_l.competence, rtol=0, atol=0)
    assert remote.density_check.refuted == {2} and float(out_r.competence[2].abs().max()) == 0
    assert [s.samples for s in hub.pool.stats()] == [128 + 8] * 3
    # every sample carried a density (the gate asked for it), counted on both sides
    assert [s.density_samples for s in hub.pool.stats()] == [128 + 8] * 3
    reports = hub.end_session()
    assert [r["samples"] for r in reports] == [128 + 8] * 3
    assert all((a.join()["forward_calls"], a.join()["density_samples"]) == (2, 128 + 8) for a in agents)


def test_a_draw_over_grpc_is_the_in_process_draw_and_a_teacher_s_bad_draw_is_refused(hub_factory, pki):
    """student-refit-draw's Draw over TLS: the same images as the in-process host's for the same seed, counted by
    the hub and by the agent; a refusal (a class out of range) and an answer that is not what was asked (a host
    that sends the wrong shape) come back as None, counted as missed, and the teacher answers on."""
    tokens = {"teacher-000": "token-0", "teacher-001": "token-1"}
    hub = hub_factory(tokens, tls=server_tls(pki))
    honest, wrong = make_density_host(0), make_density_host(1)
    real_draw = wrong.draw
    wrong.draw = lambda count, label, state, *, seed: real_draw(count + 1, label, state, seed=seed)  # one too many
    agents = [Running(h, hub.port, token=t, tls=client_tls(pki)) for h, t in zip((honest, wrong), tokens.values())]
    hub.wait_for_teachers(timeout=20)
    assert [d.draws_density for d in hub.pool.descriptions] == [True, True]
    drawn = hub.pool.draw(0, 16, 3, STATE, seed=7)
    torch.testing.assert_close(drawn, make_density_host(0).draw(16, 3, STATE, seed=7), rtol=0, atol=0)
    assert hub.pool.draw(0, 16, 10, STATE, seed=7) is None  # refused by the teacher: class 10 of 10 classes
    assert hub.pool.draw(1, 16, 3, STATE, seed=7) is None  # 17 images for 16 asked: not believed
    stats = hub.pool.stats()
    assert (stats[0].draw_calls, stats[0].drawn_samples, stats[0].missed) == (1, 16, 1)
    assert (stats[1].draw_calls, stats[1].missed) == (0, 1)
    x = torch.randn(4, *SHAPE)
    assert sorted(hub.pool.forward(x, STATE)) == [0, 1]  # both answer on
    hub.end_session()
    assert agents[0].join()["drawn_samples"] == 16 and agents[0].join()["refused"] == 1


def test_an_old_style_backward_carrying_the_inputs_still_works(hub_factory, pki):
    hub, hosts, agents = two_teacher_hub(hub_factory, pki)
    x = torch.randn(8, *SHAPE)
    hub.pool.forward(x, STATE)  # no keep: nothing to name
    g = torch.randn(8, 10)
    remote = hub.pool.backward(x, {0: (g, {}), 1: (g, {})}, STATE)
    for k, host in enumerate([make_host(0), make_host(1)]):
        host.forward(x, STATE)
        torch.testing.assert_close(remote[k], host.backward(x, g, STATE), rtol=1e-6, atol=1e-7)
    # a Backward naming a Forward the teacher no longer keeps is refused, and sent again with the inputs
    stale = hub.pool.backward(x, {0: (g, {})}, STATE, refs={0: (hub.slots[0].connection, 999)})
    torch.testing.assert_close(stale[0], remote[0])
    assert hub.pool.stats()[0].missed == 0
    hub.end_session()
    assert agents[0].join()["refused"] == 1


def test_health_and_reflection_are_served(hub_factory, pki):
    hub = hub_factory({"teacher-000": "t"}, tls=server_tls(pki))
    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="fedkd.v1.Hub"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=5)
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"fedkd.v1.Hub", "grpc.health.v1.Health"} <= names


def _hello(host=None, session=""):
    host = host or make_host(0)
    return pb.AgentMessage(hello=pb.Hello(session=session, description=encode_description(host.description)))


def _open(channel, messages, metadata=None):
    """Start a session with the given first messages and return the first answer (or raise RpcError)."""
    call = pb_grpc.HubStub(channel).Session(iter(messages), metadata=metadata, timeout=10)
    return next(call)


@pytest.mark.parametrize("metadata, code, text", [
    (None, grpc.StatusCode.UNAUTHENTICATED, "no credentials"),
    ([("authorization", "Bearer wrong")], grpc.StatusCode.UNAUTHENTICATED, "token not recognised"),
    ([("authorization", "token-zero")], grpc.StatusCode.UNAUTHENTICATED, "Bearer"),
])
def test_wrong_or_missing_tokens_are_refused_before_any_query(hub_factory, pki, metadata, code, text):
    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki))
    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _open(channel, [_hello()], metadata)
    assert err.value.code() == code and text in err.value.details()
    assert hub.live() == [] and hub.slots[0].joins == 0 and hub.refused_peers == 1


def test_plaintext_client_cannot_talk_to_a_tls_hub(hub_factory, pki):
    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki))
    with grpc.insecure_channel(f"localhost:{hub.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            _open(channel, [_hello()], [("authorization", "Bearer token-zero")])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert hub.slots[0].joins == 0


def test_an_agent_with_a_wrong_token_stops_with_a_clear_error(hub_factory, pki):
    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki))
    agent = Running(make_host(0), hub.port, token="guess", tls=client_tls(pki))
    result = agent.join()
    assert isinstance(result, AgentError) and "UNAUTHENTICATED" in str(result)


def test_mutual_tls_admits_the_run_s_certificates_only(hub_factory, pki):
    hub = hub_factory({"teacher-000": None, "teacher-001": None}, tls=server_tls(pki, mutual=True))
    good = Running(make_host(0), hub.port, tls=client_tls(pki, "teacher-000"))
    hub.wait_for_teachers(1, timeout=20)
    assert hub.slots[0].live and not hub.slots[1].live
    intruder = Running(make_host(1), hub.port, tls=client_tls(pki, "intruder"))
    result = intruder.join()
    assert isinstance(result, AgentError) and "PERMISSION_DENIED" in str(result) and "intruder" in str(result)
    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:  # no certificate
        with pytest.raises(grpc.RpcError) as err:
            _open(channel, [_hello()])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    hub.end_session()
    assert good.join()["refused"] == 0


def test_bad_hello_unknown_session_and_a_different_teacher_on_rejoin(hub_factory, pki):
    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki), hello_timeout=2)
    auth = [("authorization", "Bearer token-zero")]
    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:
        for messages, code, text in [
            ([pb.AgentMessage(spent=pb.Spent())], grpc.StatusCode.INVALID_ARGUMENT, "first message"),
            ([_hello(session="another-run")], grpc.StatusCode.FAILED_PRECONDITION, "unknown session 'another-run'"),
            ([pb.AgentMessage(hello=pb.Hello())], grpc.StatusCode.INVALID_ARGUMENT, "num_classes"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                _open(channel, messages, auth)
            assert err.value.code() == code and text in err.value.details()
        welcome = _open(channel, [_hello(session="test-run")], auth)
        assert welcome.welcome.teacher == "teacher-000"
        other = make_host(0)
        other.description = TeacherDescription(**{**other.description.__dict__, "model": "cnn"})
        with pytest.raises(grpc.RpcError) as err:
            _open(channel, [_hello(other)], auth)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "different teacher" in err.value.details()
        assert "model 'cnn' (joined as 'lenet5-half')" in err.value.details()  # the field that differs, named


def _described(**changes):
    host = make_host(0)
    host.description = TeacherDescription(**{**host.description.__dict__, **changes})
    return host


@pytest.mark.parametrize("changes, text", [
    ({"mean": (float("nan"),)}, "mean must be finite"),
    ({"std": (float("nan"),)}, "std must be finite"),
    ({"std": (float("inf"),)}, "std must be finite"),
    ({"mean": (1e30,)}, "mean must be finite numbers within"),
    ({"std": (0.0,)}, "std must be finite numbers in (0,"),
    ({"num_classes": 10**9}, "num_classes must be from 2 to"),
    ({"input_shape": (1, 8, 10**6)}, "input_shape must be"),
    ({"privacy": {"mechanism": "dp-sgd", "epsilon_budget": float("nan"), "epsilon_spent": 1.0, "delta": 1e-5,
                  "unit": "record"}}, "privacy.epsilon_budget must be a finite number"),
    ({"privacy": {"mechanism": "dp-sgd", "epsilon_budget": 8.0, "epsilon_spent": -1.0, "delta": 1e-5,
                  "unit": "record"}}, "privacy.epsilon_spent must be a finite number >= 0"),
    ({"model": "m" * 3_000_000}, "model must be printable text of at most 200 characters, got 3,000,000"),
    ({"model": "lenet5\x1b[2J"}, "with control characters"),
    ({"privacy": {"mechanism": "dp-sgd" * 1000, "epsilon_budget": 8.0, "epsilon_spent": 1.0, "delta": 1e-5,
                  "unit": "record"}}, "privacy.mechanism must be printable text of at most 200"),
])
def test_a_hostile_hello_is_refused_and_the_slot_stays_usable_by_its_teacher(hub_factory, pki, changes, text):
    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki))
    auth = [("authorization", "Bearer token-zero")]
    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _open(channel, [_hello(_described(**changes))], auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details()
        assert hub.slots[0].description is None  # nothing of the hostile description was pinned to the slot
        assert _open(channel, [_hello()], auth).welcome.teacher == "teacher-000"  # the real teacher joins


def test_a_teacher_the_run_cannot_use_is_refused_at_hello_and_the_quorum_decides(hub_factory, pki):
    from fedkd.data import SPECS

    spec = SPECS["digits"]  # 10 classes, (1, 8, 8)
    desc = {"mean": spec.mean, "std": spec.std}
    slots = {"teacher-000": "token-zero", "teacher-001": "token-one", "teacher-002": "token-two"}
    hub = hub_factory(slots, tls=server_tls(pki), spec=spec)
    good = [Running(_described(**desc), hub.port, token=t, tls=client_tls(pki)) for t in ("token-zero", "token-one")]
    wrong = Running(_described(**desc, num_classes=100, label_counts=None), hub.port, token="token-two",
                    tls=client_tls(pki))
    result = wrong.join()
    assert isinstance(result, AgentError) and "INVALID_ARGUMENT" in str(result)
    assert "num_classes 100, the run's data has 10 classes" in str(result)
    started = time.monotonic()
    hub.wait_for_teachers(timeout=60)  # 2 of 3 live and a quorum: no waiting out the minute for the third
    assert time.monotonic() - started < 20 and len(hub.live()) == 2
    assert hub.refusals() == {"teacher-002": "description: num_classes 100, the run's data has 10 classes"}
    assert hub.drop_absent() == ["teacher-002"] and [s.name for s in hub.slots] == ["teacher-000", "teacher-001"]
    hub.end_session()
    assert all(isinstance(a.join(), dict) for a in good)


def test_below_quorum_after_refusals_the_wait_fails_at_once_naming_them(hub_factory, pki):
    from fedkd.data import SPECS

    spec = SPECS["digits"]
    hub = hub_factory({"teacher-000": "token-zero", "teacher-001": "token-one"}, tls=server_tls(pki), spec=spec)
    for token in ("token-zero", "token-one"):  # neither takes the run's 8x8 inputs
        Running(_described(mean=spec.mean, std=spec.std, input_shape=(1, 28, 28)), hub.port, token=token,
                tls=client_tls(pki)).join()
    started = time.monotonic()
    with pytest.raises(QuorumError, match=r"0 of 2 teachers connected.*input_shape \(1, 28, 28\)"):
        hub.wait_for_teachers(timeout=60)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("case", ["wrong CA", "no CA", "plaintext agent", "TLS agent, plaintext hub", "wrong name",
                                  "no client certificate", "client certificate of another CA"])
def test_certificate_failures_stop_the_agent_at_once_naming_the_certificate(hub_factory, pki, tmp_path, case):
    other = make_dev_pki(tmp_path / "other", clients=["teacher-000"])
    mutual = "client certificate" in case
    hub = hub_factory({"teacher-000": None if mutual else "token-zero"},
                      tls=None if "plaintext hub" in case else server_tls(pki, mutual=mutual))
    foreign = ClientTLS(pki.ca_cert.read_bytes(), *(f.read_bytes() for f in other.clients["teacher-000"]))
    tls = {"wrong CA": ClientTLS(other.ca_cert.read_bytes()), "no CA": ClientTLS(None), "plaintext agent": None,
           "TLS agent, plaintext hub": client_tls(pki), "wrong name": client_tls(pki),
           "no client certificate": client_tls(pki), "client certificate of another CA": foreign}[case]
    extra = {"server_name": "not-the-hub.example"} if case == "wrong name" else {}
    started = time.monotonic()
    agent = Running(make_host(0), hub.port, token="token-zero", tls=tls, give_up_after=120, **extra)
    result = agent.join(timeout=30)
    assert isinstance(result, AgentError), result
    assert time.monotonic() - started < 15  # not retried for the whole give-up-after
    expected = {"wrong CA": "does not verify against the CA given with --ca", "no CA": "the system's CAs (no --ca)",
                "plaintext agent": "it expects TLS and this agent runs plaintext",
                "TLS agent, plaintext hub": "does not speak TLS", "wrong name": "not valid for the name",
                "no client certificate": "it expects a client certificate (mutual TLS)",
                "client certificate of another CA": "does not accept this agent's client certificate"}[case]
    assert expected in str(result), result
    assert hub.slots[0].joins == 0


def test_a_hub_that_stops_on_an_error_sends_the_agents_away_with_the_reason(hub_factory, pki):
    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki))
    agent = Running(make_host(0), hub.port, token="token-zero", tls=client_tls(pki))
    hub.wait_for_teachers(timeout=20)
    with pytest.raises(RuntimeError, match="the dataset went away"):
        with hub:
            raise RuntimeError("the dataset went away")
    result = agent.join(timeout=15)
    assert isinstance(result, SessionAborted) and "the dataset went away" in str(result)
    assert result.released["forward_calls"] == 0


def test_an_interrupted_hub_says_nothing_so_its_agents_wait_for_the_resumed_run(hub_factory, pki):
    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki))
    port = hub.port
    agent = Running(make_host(0), port, token="token-zero", tls=client_tls(pki))
    hub.wait_for_teachers(timeout=20)
    with pytest.raises(KeyboardInterrupt):
        with hub:
            raise KeyboardInterrupt
    time.sleep(0.5)
    assert agent.thread.is_alive()  # still retrying
    again = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki), address=f"127.0.0.1:{port}")
    again.wait_for_teachers(timeout=20)
    assert again.slots[0].joins == 1
    again.end_session()
    assert isinstance(agent.join(), dict)


def _malformed(rng, host):
    """One malformed query and the status code the agent must answer it with."""
    good = torch.randn(4, *SHAPE)
    kind = rng.randrange(12)
    if kind == 0:
        return {"forward": pb.ForwardRequest(inputs=encode_tensor(good.double()))}, "INVALID_ARGUMENT"
    if kind == 1:
        shape = (4, 1, rng.choice([7, 9, 28]), 8)
        return {"forward": pb.ForwardRequest(inputs=encode_tensor(torch.randn(shape)))}, "INVALID_ARGUMENT"
    if kind == 2:
        bad = good.clone()
        bad.view(-1)[rng.randrange(bad.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        return {"forward": pb.ForwardRequest(inputs=encode_tensor(bad))}, "INVALID_ARGUMENT"
    if kind == 3:
        big = torch.zeros(host.max_batch + rng.randrange(1, 50), *SHAPE)
        return {"forward": pb.ForwardRequest(inputs=encode_tensor(big))}, "RESOURCE_EXHAUSTED"
    if kind == 4:
        t = encode_tensor(good)
        t.data = t.data[: rng.randrange(len(t.data))]
        return {"forward": pb.ForwardRequest(inputs=t)}, "INVALID_ARGUMENT"
    if kind == 5:
        return {"forward": pb.ForwardRequest(inputs=pb.Tensor(dtype=rng.choice([0, 11, 42, 1000]), shape=[4],
                                                              data=b"\0" * 16))}, "INVALID_ARGUMENT"
    if kind == 6:
        return {"forward": pb.ForwardRequest(inputs=pb.Tensor(dtype=pb.FLOAT32, shape=[4, -1, 8, 8]))}, \
            "INVALID_ARGUMENT"
    if kind == 7:  # gradients for inputs this teacher never answered
        return {"backward": pb.BackwardRequest(inputs=encode_tensor(torch.randn(4, *SHAPE)),
                                               grad_logits=encode_tensor(torch.randn(4, 10)))}, "FAILED_PRECONDITION"
    if kind == 8:
        return {"backward": pb.BackwardRequest(inputs=encode_tensor(good),
                                               grad_logits=encode_tensor(torch.randn(4, rng.choice([3, 11]))))}, \
            "INVALID_ARGUMENT"
    if kind == 9:
        state = pb.CurriculumState(lam=rng.choice([float("nan"), float("inf")]))
        return {"forward": pb.ForwardRequest(inputs=encode_tensor(good), state=state)}, "INVALID_ARGUMENT"
    if kind == 10:
        return {"forward": pb.ForwardRequest()}, "INVALID_ARGUMENT"  # no inputs at all: an empty tensor
    return {"welcome": pb.Welcome()}, "INVALID_ARGUMENT"  # not a query


def test_thousands_of_malformed_queries_then_a_valid_one(hub_factory, pki):
    hub, hosts, agents = two_teacher_hub(hub_factory, pki)
    connection = hub.slots[0].connection
    rng = random.Random(0)
    codes = {c.value[0]: c.name for c in grpc.StatusCode}
    seen = set()
    for _ in range(2000):
        message, expected = _malformed(rng, hosts[0])
        _, future, _ = connection.send(**message)
        answer = future.result(timeout=10)
        assert answer.WhichOneof("kind") == "error", message
        assert codes[answer.error.code] == expected, answer.error.message
        assert answer.error.message
        seen.add(expected)
    assert seen == {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}
    assert hub.slots[0].connection is connection and hub.slots[0].joins == 1  # never dropped
    x = torch.randn(8, *SHAPE)
    out = Ensemble(hub.pool, "logit-mean")(x, STATE)
    expected = (hosts[0].model(x) + hosts[1].model(x)) / 2
    torch.testing.assert_close(out.logits, expected.detach())
    assert hosts[0].stats.refused == 2000


def test_the_hub_survives_garbage_from_a_teacher(hub_factory, pki):
    hub = hub_factory({"teacher-000": "a", "teacher-001": "b", "teacher-002": "c"}, tls=server_tls(pki), quorum=2)
    hosts = [make_host(0), make_host(1)]
    for host, token in zip(hosts, "ab"):
        Running(host, hub.port, token=token, tls=client_tls(pki))
    hub.wait_for_teachers(2, timeout=20)
    auth = [("authorization", "Bearer c")]
    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:
        # Raw bytes that are no AgentMessage: that stream fails, nothing else does.
        raw = channel.stream_stream("/fedkd.v1.Hub/Session", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        for junk in (b"\xff" * 10, bytes(range(256)), b"\x0a\xff\xff\xff\xff\x0f"):
            with pytest.raises(grpc.RpcError):
                list(raw(iter([junk]), metadata=auth, timeout=5))
        # A third teacher joins and then answers nonsense: replies to queries never sent, duplicate Hellos,
        # empty messages. The hub counts them and goes on.
        rng = random.Random(1)
        nonsense = [rng.choice([pb.AgentMessage(id=rng.randrange(1, 10**7), forward=pb.ForwardReply()),
                                pb.AgentMessage(id=rng.randrange(1, 10**7), error=pb.Status(code=3)),
                                _hello(), pb.AgentMessage()]) for _ in range(1000)]
        call = pb_grpc.HubStub(channel).Session(iter([_hello(), *nonsense]), metadata=auth, timeout=20)
        assert next(call).welcome.teacher == "teacher-002"
        deadline = time.monotonic() + 20
        while hub.protocol_errors < 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hub.protocol_errors == 1000
        call.cancel()
    deadline = time.monotonic() + 10
    while hub.slots[2].live and time.monotonic() < deadline:
        time.sleep(0.05)
    x = torch.randn(8, *SHAPE)
    out = Ensemble(hub.pool, "logit-mean")(x, STATE)
    assert out.members == [0, 1]
    torch.testing.assert_close(out.logits, ((hosts[0].model(x) + hosts[1].model(x)) / 2).detach())


def test_a_slow_teacher_misses_the_deadline_and_the_quorum_carries_on(hub_factory, pki):
    hub, hosts, agents = two_teacher_hub(hub_factory, pki, query_timeout=0.5, quorum=1)
    original = hosts[1].forward

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return original(*args, **kwargs)

    hosts[1].forward = slow
    out = Ensemble(hub.pool)(torch.randn(4, *SHAPE), STATE)
    assert out.members == [0]
    assert hub.pool.stats()[1].missed == 1
    with pytest.raises(QuorumError, match=r"1 of 2 teachers answered, 2 needed .*teacher-001: no answer within"):
        Ensemble(hub.pool)(torch.randn(4, *SHAPE), STATE, require_all=True)
    hosts[1].forward = original
    time.sleep(1.2)  # let the late answers arrive (and be dropped)
    assert Ensemble(hub.pool)(torch.randn(4, *SHAPE), STATE).members == [0, 1]


@pytest.mark.slow
def test_the_straggler_policy_goes_on_without_a_slow_teacher_once_the_quorum_has_answered(hub_factory, pki, caplog):
    """A teacher that always answers just inside query-timeout would set the pace of every query; with
    straggler-factor F the others wait F x the median answer time (at least 1 s) once the quorum has answered."""
    hub, hosts, agents = two_teacher_hub(hub_factory, pki, query_timeout=30.0, quorum=1, straggler_factor=3.0)
    original = hosts[1].forward

    def slow(*args, **kwargs):
        time.sleep(4.0)
        return original(*args, **kwargs)

    hosts[1].forward = slow
    started = time.monotonic()
    out = Ensemble(hub.pool, reliability=False)(torch.randn(4, *SHAPE), STATE)
    waited = time.monotonic() - started
    assert out.members == [0] and 1.0 <= waited < 3.0  # the 1 s floor, not the teacher's 4 s nor the 30 s deadline
    stats = hub.pool.stats()[1]
    assert (stats.late, stats.missed, stats.forward_calls) == (1, 1, 0)
    assert 900 <= stats.answer_ms < 3000 and hub.pool.stats()[0].late == 0
    assert "teacher-001: late: no answer within 1 s, 3 x the median answer time" in caplog.text
    hosts[1].forward = original
    time.sleep(4.5)  # the late answers arrive and are dropped
    hub.straggler_factor = 0.0  # off: every teacher is waited for, as before
    hosts[1].forward = slow
    started = time.monotonic()
    assert Ensemble(hub.pool, reliability=False)(torch.randn(4, *SHAPE), STATE).members == [0, 1]
    assert time.monotonic() - started >= 4.0


def test_a_refusing_teacher_is_left_out_and_named(hub_factory, pki):
    hub = hub_factory({"teacher-000": "a", "teacher-001": "b"}, tls=server_tls(pki), quorum=1)
    small = make_host(1, max_batch=4)
    Running(make_host(0), hub.port, token="a", tls=client_tls(pki))
    Running(small, hub.port, token="b", tls=client_tls(pki))
    hub.wait_for_teachers(timeout=20)
    out = Ensemble(hub.pool)(torch.randn(8, *SHAPE), STATE)
    assert out.members == [0]
    with pytest.raises(QuorumError, match="RESOURCE_EXHAUSTED: batch of 8 exceeds this client's maximum of 4"):
        Ensemble(hub.pool)(torch.randn(8, *SHAPE), STATE, require_all=True)


def test_below_quorum_the_pool_waits_for_a_rejoin_then_gives_up_clearly(hub_factory, pki):
    hub, hosts, agents = two_teacher_hub(hub_factory, pki, rejoin_timeout=1.0, quorum=2)
    agents[1].agent.stop()
    agents[1].join()
    deadline = time.monotonic() + 10
    while hub.slots[1].live and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(QuorumError, match="only 1 of 2 teachers are connected and 2 must answer; waited 1 s"):
        Ensemble(hub.pool)(torch.randn(4, *SHAPE), STATE)
    # The teacher comes back with the same token: it takes its slot again and the run goes on.
    Running(hosts[1], hub.port, token="token-one", tls=client_tls(pki))
    hub.wait_for_teachers(timeout=20)
    assert hub.slots[1].joins == 2
    assert Ensemble(hub.pool)(torch.randn(4, *SHAPE), STATE).members == [0, 1]


def test_teacher_side_terms_have_the_same_value_and_gradient_over_grpc_as_in_process(hub_factory, pki):
    hub, hosts, agents = two_teacher_hub(hub_factory, pki)
    terms = ("activation", "feature-statistics")
    remote = Ensemble(hub.pool, "logit-mean")
    local = Ensemble(LocalPool([make_host(0), make_host(1)]), "logit-mean")
    x = torch.randn(16, *SHAPE)
    xr, xl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_r, out_l = remote(xr, STATE, terms=terms), local(xl, STATE, terms=terms)
    assert set(out_r.terms) == set(terms)
    for name in terms:
        torch.testing.assert_close(out_r.terms[name], out_l.terms[name], rtol=0, atol=0)
    (out_r.logits.sum() - 0.1 * out_r.terms["activation"] + out_r.terms["feature-statistics"]).backward()
    (out_l.logits.sum() - 0.1 * out_l.terms["activation"] + out_l.terms["feature-statistics"]).backward()
    torch.testing.assert_close(xr.grad, xl.grad, rtol=1e-6, atol=1e-7)
    # the activation term moved the gradient: it is not the logits-only gradient
    xo = x.clone().requires_grad_(True)
    out_o = local(xo, STATE, terms=("feature-statistics",))
    (out_o.logits.sum() + out_o.terms["feature-statistics"]).backward()
    assert not torch.allclose(xo.grad, xl.grad)
    hub.end_session()


def test_old_style_bn_fields_still_work_against_an_agent_that_knows_terms():
    """A hub that predates ``terms`` sends only ForwardRequest.bn_loss and BackwardRequest.grad_bn_loss."""
    host, reference = make_host(0), make_host(0)
    agent = TeacherAgent(host, AgentSettings(target="localhost:1"))
    x = torch.randn(4, *SHAPE)
    reply = agent._answer(pb.HubMessage(id=3, forward=pb.ForwardRequest(
        inputs=encode_tensor(x), bn_loss=True, keep=True)))
    expected = reference.forward(x, STATE, terms=(FEATURE_STATISTICS,)).terms[FEATURE_STATISTICS]
    assert reply.forward.HasField("bn_loss") and reply.forward.bn_loss == pytest.approx(float(expected))
    assert dict(reply.forward.terms) == {"feature-statistics": pytest.approx(float(expected))}
    g = torch.randn(4, 10)
    back = agent._answer(pb.HubMessage(id=4, backward=pb.BackwardRequest(
        forward_id=3, grad_logits=encode_tensor(g), grad_bn_loss=2.0)))
    from fedkd.codec import decode_tensor
    torch.testing.assert_close(decode_tensor(back.backward.grad_inputs),
                               reference.backward(x, g, STATE, grad_terms={"feature-statistics": 2.0}),
                               rtol=1e-6, atol=1e-7)


def test_a_term_the_teacher_cannot_compute_is_refused_naming_it():
    host = make_host(0)
    agent = TeacherAgent(host, AgentSettings(target="localhost:1"))
    x = encode_tensor(torch.randn(4, *SHAPE))
    reply = agent._answer(pb.HubMessage(id=5, forward=pb.ForwardRequest(inputs=x, terms=["feature-alignment"])))
    assert reply.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "'feature-alignment'" in reply.error.message and "activation" in reply.error.message
    desc = TeacherDescription(client=0, model="lenet5-half", num_classes=10, input_shape=SHAPE, mean=(0.5,),
                              std=(0.25,), terms=("feature-statistics",))
    only_bn = TeacherHost(make_host(0).model, desc)
    reply = TeacherAgent(only_bn, AgentSettings(target="localhost:1"))._answer(
        pb.HubMessage(id=6, forward=pb.ForwardRequest(inputs=x, terms=["activation"])))
    assert reply.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "does not compute the term 'activation'" in reply.error.message


@pytest.mark.parametrize("reports", [True, False])
def test_a_spend_report_nobody_asked_for_is_ignored(hub_factory, pki, reports):
    """Only the answer to the goodbye is a teacher's report: a false one sent before it (10^9 calls) was once
    taken as the report of a teacher that then sent none, or was replaced by one sent after it."""
    import queue

    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki))
    outbox: queue.Queue = queue.Queue()
    outbox.put(_hello())
    outbox.put(pb.AgentMessage(id=999, spent=pb.Spent(forward_calls=10**9, samples=10**12)))

    def requests():
        while (msg := outbox.get()) is not None:
            yield msg

    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:
        call = pb_grpc.HubStub(channel).Session(requests(), metadata=[("authorization", "Bearer token-zero")],
                                                timeout=30)

        def answer():
            for msg in call:
                if msg.WhichOneof("kind") == "goodbye":
                    if reports:
                        outbox.put(pb.AgentMessage(id=msg.id, spent=pb.Spent(forward_calls=0, samples=0)))
                    outbox.put(pb.AgentMessage(id=msg.id + 1, spent=pb.Spent(forward_calls=10**9, samples=10**12)))
                    outbox.put(None)

        reader = threading.Thread(target=answer, daemon=True)
        reader.start()
        hub.wait_for_teachers(timeout=20)
        time.sleep(0.3)  # the first false report has arrived
        (report,) = hub.end_session(timeout=3)
        reader.join(10)
    if reports:
        assert report["forward_calls"] == 0 and report["samples"] == 0
    else:
        assert report == {"client": 0, "name": "teacher-000", "reported": False}
    assert hub.protocol_errors >= 1


def test_silent_streams_of_one_token_cannot_lock_the_other_teachers_out(hub_factory, pki):
    """14 streams that authenticate with one teacher's token and never say Hello once filled the hub's
    concurrent-call limit: the other teachers got RESOURCE_EXHAUSTED. A slot holds one pending stream."""
    hub = hub_factory({"teacher-000": "token-zero", "teacher-001": "token-one"}, tls=server_tls(pki))
    silence = threading.Event()

    def nothing():
        silence.wait(30)
        return
        yield  # a generator that sends nothing until the test ends

    calls = []
    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:
        try:
            for _ in range(14):
                calls.append(pb_grpc.HubStub(channel).Session(
                    nothing(), metadata=[("authorization", "Bearer token-zero")], timeout=30))
                time.sleep(0.02)
            time.sleep(0.3)
            honest = Running(make_host(1), hub.port, token="token-one", tls=client_tls(pki))
            deadline = time.monotonic() + 10
            while hub.slots[1].connection is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert hub.slots[1].connection is not None, honest.result
            assert hub.replaced_streams >= 12  # each silent stream was cancelled by the next one
        finally:
            silence.set()
            for call in calls:
                call.cancel()


def test_a_flood_of_bad_tokens_is_counted_not_logged_line_by_line(hub_factory, pki, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="fedkd.server.hub")
    hub = hub_factory({"teacher-000": "token-zero"}, tls=server_tls(pki))
    with grpc.secure_channel(f"localhost:{hub.port}", client_tls(pki).credentials()) as channel:
        for _ in range(60):
            with pytest.raises(grpc.RpcError):
                _open(channel, [_hello()], [("authorization", "Bearer wrong")])
    assert hub.refused_peers == 60
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refusals) <= 6 and "the next are logged once a minute" in caplog.text


def test_what_the_coordinator_waits_for_each_teacher_is_counted_per_teacher(hub_factory, pki):
    """A slow teacher sets the pace of every query: its latency is in its stats (and the summary), over gRPC as
    in-process."""

    class Slow(TeacherHost):
        def forward(self, *args, **kwargs):
            time.sleep(0.3)
            return super().forward(*args, **kwargs)

    def slow_host():
        fast = make_host(1)
        return Slow(fast.model, fast.description, max_batch=256)

    hub = hub_factory({"teacher-000": "token-zero", "teacher-001": "token-one"}, tls=server_tls(pki))
    agents = [Running(h, hub.port, token=t, tls=client_tls(pki))
              for h, t in zip([make_host(0), slow_host()], ["token-zero", "token-one"])]
    hub.wait_for_teachers(timeout=20)
    local = LocalPool([make_host(0), slow_host()])
    for pool in (hub.pool, local):
        for _ in range(2):
            pool.forward(torch.randn(4, *SHAPE), STATE)
        fast, slow = pool.stats()
        assert slow.answer_ms >= 2 * 300 and fast.answer_ms < slow.answer_ms / 2, (fast, slow)
    hub.end_session()
    assert all(isinstance(a.join(), dict) for a in agents)
