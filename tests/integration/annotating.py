"""Helpers of the active-learning integration tests: an isolated namespace of topics and
real AnnotationRequest events, produced as the tier workers produce them."""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from cassandra.cluster import Session
from harness import TEST_KEYSPACE

from phenocascade.config import Settings, Topology, load_topology
from phenocascade.consumers.annotation_sink import AnnotationSink, SinkStats
from phenocascade.domain import Box, ImageMeta, StageOutput
from phenocascade.store.cassandra import connect
from phenocascade.store.users import add_user
from phenocascade.streams import events
from phenocascade.streams.kafka import create_topics, plain_producer
from phenocascade.streams.serde import EventCodec
from phenocascade.ui.security import hash_password


class AnnotationWorld:
    """Namespaced topics, the shared test keyspace, and a unique study for one test module."""

    def __init__(self, infra: Settings) -> None:
        self.prefix = f"al{uuid.uuid4().hex[:8]}-"
        self.topology: Topology = load_topology().namespaced(self.prefix)
        self.settings = infra.model_copy(
            update={"cassandra": infra.cassandra.model_copy(update={"keyspace": TEST_KEYSPACE})}
        )
        self.study = f"study-{self.prefix[:-1]}"
        self.codec = EventCodec()
        create_topics(self.settings.kafka, self.topology)
        self.session: Session = connect(self.settings.cassandra)

    def request(
        self,
        image_id: str,
        *,
        tier: str,
        path: Path,
        scores: dict[str, float],
        classes: Sequence[str],
        boxes: Sequence[Box] = (),
        study: str | None = None,
        ask: Sequence[str] = (),
    ) -> tuple[dict[str, Any], bytes]:
        """Return an ``AnnotationRequest`` record and its original ``ImageSubmitted`` bytes.

        ``image_id`` is prefixed with this world's namespace, so reruns never collide in the
        shared keyspace.
        """
        image_id = self.prefix + image_id
        submitted = events.image_submitted(
            image_id,
            uri=str(path),
            fmt=events.format_of(path.name),
            meta=ImageMeta(study=self.study if study is None else study),
        )
        submitted_bytes = self.codec.encode("ImageSubmitted", submitted)
        request = events.annotation_request(
            submitted,
            submitted_bytes,
            tier=tier,
            output=StageOutput(scores=scores, boxes=tuple(boxes)),
            classes=classes,
            model_name=f"{tier}-test-model",
            model_version="v-test",
            ask=ask,
        )
        return request, submitted_bytes

    def produce(self, values: Sequence[tuple[bytes, bytes]]) -> None:
        """Produce ``(key, value)`` pairs to the annotate topic and wait for the acks."""
        producer = plain_producer(self.settings.kafka)
        for key, value in values:
            producer.produce(self.topology.annotate_topic, key=key, value=value)
        assert producer.flush(30) == 0

    def encode(self, request: dict[str, Any]) -> tuple[bytes, bytes]:
        return request["image_id"].encode(), self.codec.encode("AnnotationRequest", request)

    def run_sink(self, timeout_s: float = 120.0) -> SinkStats:
        """Run the sink (real consumer group) until it has read the whole annotate topic."""
        stop = threading.Event()
        # A safety net only: the sink normally stops itself once caught up.
        timer = threading.Timer(timeout_s, stop.set)
        timer.start()
        try:
            sink = AnnotationSink(
                settings=self.settings,
                topology=self.topology,
                session=self.session,
            )
            return sink.run(stop, until_caught_up=True)
        finally:
            timer.cancel()


class ExpertClient:
    """An expert using the annotation app's HTTP API, as the browser's pages do.

    Logs in with the login page's CSRF token, then reads the queue page's token for the
    state-changing requests (``X-CSRF-Token``), exactly like ``common.js``. The session
    cookie is ``Secure``, which a browser sends to a loopback server but an HTTP client
    library does not, so it is carried by hand.
    """

    def __init__(self, client: Any, username: str, password: str) -> None:
        self.client = client
        self.cookie = ""
        token = self._csrf(self._send("GET", "/login").text)
        response = self._send(
            "POST",
            "/login",
            json={"username": username, "password": password},
            headers={"X-CSRF-Token": token},
        )
        assert response.status_code == 200, response.text
        self.token = self._csrf(self._send("GET", "/queue").text)

    def _send(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if self.cookie:
            headers["Cookie"] = self.cookie
        response = self.client.request(method, url, headers=headers, **kwargs)
        self.client.cookies.clear()
        for header in response.headers.get_list("set-cookie"):
            self.cookie = header.split(";", 1)[0]
        return response

    @staticmethod
    def _csrf(html: str) -> str:
        match = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
        assert match is not None, html[:500]
        return match.group(1)

    def tasks(self, tier: str, study: str) -> list[dict[str, Any]]:
        response = self._send("GET", "/api/tasks", params={"tier": tier, "study": study})
        assert response.status_code == 200, response.text
        tasks: list[dict[str, Any]] = response.json()["tasks"]
        return tasks

    def annotate(
        self, tier: str, image_id: str, labels: Sequence[str], boxes: Sequence[dict[str, Any]] = ()
    ) -> dict[str, Any]:
        response = self._send(
            "POST",
            "/api/annotations",
            json={"image_id": image_id, "tier": tier, "labels": list(labels), "boxes": list(boxes)},
            headers={"X-CSRF-Token": self.token},
        )
        assert response.status_code == 201, response.text
        saved: dict[str, Any] = response.json()
        return saved


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yield its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


PASSWORD = "correct horse battery staple"


def add_test_user(session: Any, role: str, studies: Sequence[str] = (), prefix: str = "") -> str:
    """Add a user of ``role`` granted ``studies``; return its name (password: PASSWORD)."""
    name = f"{prefix}{role}-{uuid.uuid4().hex[:8]}"
    assert add_user(
        session=session,
        username=name,
        password_hash=hash_password(PASSWORD),
        role=role,
        studies=list(studies),
    )
    return name
