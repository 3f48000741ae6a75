"""The annotation app in a real browser (Debian's Chromium via Playwright) against the real
local Kafka and Cassandra: seed tasks through the sink, log in, label the three tiers with
the keyboard and the mouse, and check what reached Kafka and Cassandra."""

from __future__ import annotations

import io
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotating import AnnotationWorld, serve
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from phenocascade.config import Settings
from phenocascade.domain import Box
from phenocascade.imaging import read_image
from phenocascade.store.annotations import annotations_for_image, get_task
from phenocascade.store.users import add_user, get_user
from phenocascade.streams.scan import scan_topic
from phenocascade.ui.app import create_app
from phenocascade.ui.images import window
from phenocascade.ui.security import hash_password

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/ui_viewer.png")
PASSWORD = "correct horse battery"
MAJORITY_CLASSES = ["density:dense", "density:sparse", "nucleus_size:large", "nucleus_size:small"]
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]


@dataclass
class Seeded:
    world: AnnotationWorld
    gate: dict[str, Any]
    gate_submitted: bytes
    classifier: dict[str, Any]
    detector: dict[str, Any]
    spare_detector: dict[str, Any]
    annotator: str
    base_url: str


def _voc_boxes(xml: Path, label: str) -> list[Box]:
    root = ET.parse(xml).getroot()
    boxes = []
    for obj in root.iter("object"):
        if obj.findtext("name") != label:
            continue
        bb = obj.find("bndbox")
        assert bb is not None
        x0, y0, x1, y1 = (float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append(Box(x0, y0, x1, y1, label, 0.61))
    return boxes


@pytest.fixture(scope="module")
def seeded(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    world = AnnotationWorld(infra)
    data = infra.datasets.resolve()
    gate_image = sorted((data / "bbbc006_focus" / "clear_zaligned10").glob("*.png"))[0]
    dsb_image = sorted((data / "dsb2018" / "images").glob("*.png"))[0]
    bccd = data / "bccd" / "BCCD"
    gate, gate_submitted = world.request(
        "gate", tier="quality", path=gate_image, scores={"clear": 0.48}, classes=["clear"]
    )
    classifier, _ = world.request(
        "classifier",
        tier="majority",
        path=dsb_image,
        scores={
            "density:dense": 0.62,
            "density:sparse": 0.08,
            "nucleus_size:large": 0.11,
            "nucleus_size:small": 0.71,
        },
        classes=MAJORITY_CLASSES,
        # Per-label routing: the tier decided the nucleus size and asks only the density.
        ask=["density:dense", "density:sparse"],
    )
    detector, _ = world.request(
        "detector",
        tier="minority",
        path=bccd / "JPEGImages" / "BloodImage_00001.jpg",
        scores={"WBC": 0.61},
        classes=BCCD_CLASSES,
        boxes=_voc_boxes(bccd / "Annotations" / "BloodImage_00001.xml", "WBC"),
    )
    spare, _ = world.request(
        "spare",
        tier="minority",
        path=bccd / "JPEGImages" / "BloodImage_00002.jpg",
        scores={"WBC": 0.55},
        classes=BCCD_CLASSES,
        boxes=_voc_boxes(bccd / "Annotations" / "BloodImage_00002.xml", "WBC"),
    )
    world.produce([world.encode(r) for r in (gate, classifier, detector, spare)])
    assert world.run_sink().created == 4

    annotator = f"ann-{world.prefix[:-1]}"
    assert add_user(
        session=world.session,
        username=annotator,
        password_hash=hash_password(PASSWORD),
        role="annotator",
        studies=[world.study],
    )
    settings = world.settings.model_copy(update={"home": tmp_path_factory.mktemp("ui-home")})
    app = create_app(settings, world.topology, session=world.session)
    with serve(app) as base_url:
        yield Seeded(world, gate, gate_submitted, classifier, detector, spare, annotator, base_url)
    world.session.cluster.shutdown()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def logged_in(browser: Browser, seeded: Seeded) -> Iterator[tuple[BrowserContext, Page]]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{seeded.base_url}/queue?study={seeded.world.study}")
    expect(page).to_have_url(
        f"{seeded.base_url}/login?next=%2Fqueue%3Fstudy%3D{seeded.world.study}"
    )
    page.fill("#username", seeded.annotator)
    page.fill("#password", PASSWORD)
    page.click("#login-submit")
    expect(page).to_have_url(f"{seeded.base_url}/queue?study={seeded.world.study}")
    yield context, page
    context.close()


def _open_viewer(page: Page, seeded: Seeded, task: dict[str, Any]) -> None:
    page.goto(
        f"{seeded.base_url}/tasks/{task['tier']}/{task['image_id']}?study={seeded.world.study}"
    )
    expect(page.locator("canvas#view[data-ready='1']")).to_have_count(1)


def _saved(page: Page) -> None:
    expect(page.locator("#status")).to_contain_text("Saved", timeout=30000)


def _annotation_events(seeded: Seeded) -> dict[str, dict[str, Any]]:
    world = seeded.world
    found = {}
    for key, value in scan_topic(world.settings.kafka, world.topology.annotations_topic):
        _, record = world.codec.decode(value, expected="Annotation")
        assert key == record["image_id"].encode()
        found[record["image_id"]] = record
    return found


def test_unauthenticated_requests_get_401_or_the_login_page(
    browser: Browser, seeded: Seeded
) -> None:
    context = browser.new_context()
    try:
        response = context.request.get(f"{seeded.base_url}/api/tasks")
        assert response.status == 401
        assert response.json()["error"] == "unauthenticated"
        posted = context.request.post(f"{seeded.base_url}/api/annotations", data={})
        assert posted.status == 401
        page = context.new_page()
        page.goto(f"{seeded.base_url}/admin/users")
        assert page.url.startswith(f"{seeded.base_url}/login")
    finally:
        context.close()


def test_the_queue_lists_the_seeded_tasks_most_uncertain_first(
    logged_in: tuple[BrowserContext, Page], seeded: Seeded
) -> None:
    _, page = logged_in
    page.goto(f"{seeded.base_url}/queue?study={seeded.world.study}")
    rows = page.locator("#queue tbody tr")
    expect(rows).to_have_count(4)
    priorities = [float(t) for t in rows.locator("td:first-child").all_inner_texts()]
    assert priorities == sorted(priorities, reverse=True)
    page.goto(f"{seeded.base_url}/queue?study={seeded.world.study}&tier=minority")
    expect(rows).to_have_count(2)


def test_annotator_labels_three_tiers_in_the_browser(
    logged_in: tuple[BrowserContext, Page], seeded: Seeded
) -> None:
    _, page = logged_in
    world = seeded.world

    # Tier 1 (gate): the keyboard only.
    _open_viewer(page, seeded, seeded.gate)
    page.locator("canvas#view").focus()
    page.keyboard.press("c")
    expect(page.locator("#gate-clear")).to_have_class("choice on")
    page.keyboard.press("Enter")
    _saved(page)
    expect(page.locator("#status")).to_contain_text("re-enters the cascade")

    # Tier 2 (classifier): the model's labels are pre-checked; correct one of them. The
    # labels it decided itself are shown, locked; only the asked ones can change.
    _open_viewer(page, seeded, seeded.classifier)
    expect(page.locator("input[data-label='density:dense']")).to_be_checked()
    expect(page.locator("input[data-label='nucleus_size:small']")).to_be_checked()
    expect(page.locator("input[data-label='nucleus_size:small']")).to_be_disabled()
    expect(page.locator("input[data-label='nucleus_size:large']")).to_be_disabled()
    expect(page.locator("input[data-label='density:sparse']")).to_be_enabled()
    expect(page.locator("label.decided")).to_have_count(2)
    page.locator("input[data-label='density:dense']").uncheck()
    page.locator("input[data-label='density:sparse']").check()
    page.locator("#save").click()
    _saved(page)

    # Tier 3 (detector): accept the predicted box, draw a new one with the mouse.
    _open_viewer(page, seeded, seeded.detector)
    predicted = page.locator("#box-list li[data-state='predicted']")
    expect(predicted).to_have_count(len(seeded.detector["boxes"]))
    page.select_option("#box-label", "Platelets")
    page.keyboard.press("b")
    canvas = page.locator("canvas#view")
    rect = canvas.bounding_box()
    assert rect is not None
    zoom = float(canvas.get_attribute("data-zoom") or "nan")
    pan_x = float(canvas.get_attribute("data-pan-x") or "nan")
    pan_y = float(canvas.get_attribute("data-pan-y") or "nan")
    want = (300.0, 300.0, 360.0, 350.0)  # image pixels, clear of the predicted WBC box

    def screen(x: float, y: float) -> tuple[float, float]:
        return rect["x"] + pan_x + x * zoom, rect["y"] + pan_y + y * zoom

    page.mouse.move(*screen(want[0], want[1]))
    page.mouse.down()
    page.mouse.move(*screen(want[2], want[3]), steps=8)
    page.mouse.up()
    drawn = page.locator("#box-list li[data-state='drawn']")
    expect(drawn).to_have_count(1)
    page.screenshot(path=str(SCREENSHOT))
    predicted.first.get_by_role("button", name="Accept").click()
    expect(page.locator("#box-list li[data-state='accepted']")).to_have_count(1)
    page.keyboard.press("Enter")
    _saved(page)

    # Kafka: one Annotation per task, keyed by image id.
    sent = _annotation_events(seeded)
    assert sent[seeded.gate["image_id"]]["labels"] == ["clear"]
    assert sent[seeded.gate["image_id"]]["annotator"] == seeded.annotator
    assert sent[seeded.classifier["image_id"]]["labels"] == ["density:sparse", "nucleus_size:small"]
    boxes = sent[seeded.detector["image_id"]]["boxes"]
    assert sorted(b["label"] for b in boxes) == ["Platelets", "WBC"]
    platelet = next(b for b in boxes if b["label"] == "Platelets")
    got = (platelet["x_min"], platelet["y_min"], platelet["x_max"], platelet["y_max"])
    assert all(abs(g - w) <= 1.5 for g, w in zip(got, want, strict=True)), got
    wbc = next(b for b in boxes if b["label"] == "WBC")
    first = seeded.detector["boxes"][0]
    assert [wbc[k] for k in ("x_min", "y_min", "x_max", "y_max")] == [
        first[k] for k in ("x_min", "y_min", "x_max", "y_max")
    ]
    assert sent[seeded.detector["image_id"]]["labels"] == ["Platelets", "WBC"]

    # Cassandra: the same labels, and every task done.
    for task in (seeded.gate, seeded.classifier, seeded.detector):
        stored = annotations_for_image(session=world.session, image_id=task["image_id"])
        assert len(stored) == 1
        event = sent[task["image_id"]]
        assert stored[0]["annotation_id"] == event["annotation_id"]
        assert stored[0]["labels"] == event["labels"]
        assert len(stored[0]["boxes"]) == len(event["boxes"])
        done = get_task(session=world.session, image_id=task["image_id"], tier=task["tier"])
        assert done is not None and done["status"] == "done"

    # Re-entry: the gate image's original submission is on the gate's pass topic.
    usable = world.topology.tier("quality").routes["pass"]
    reentered = [
        v
        for k, v in scan_topic(world.settings.kafka, usable)
        if k == seeded.gate["image_id"].encode()
    ]
    assert reentered == [seeded.gate_submitted]


def test_annotator_is_refused_admin_routes(
    logged_in: tuple[BrowserContext, Page], seeded: Seeded
) -> None:
    context, page = logged_in
    assert context.request.get(f"{seeded.base_url}/admin/api/users").status == 403
    response = page.goto(f"{seeded.base_url}/admin/users")
    assert response is not None and response.status == 403
    page.goto(f"{seeded.base_url}/queue")
    expect(page.locator("nav a[href='/admin/users']")).to_be_hidden()
    token = page.locator("meta[name='csrf-token']").get_attribute("content")
    created = context.request.post(
        f"{seeded.base_url}/admin/api/users",
        data=json.dumps({"username": f"x{uuid.uuid4().hex[:6]}", "password": PASSWORD}),
        headers={"Content-Type": "application/json", "X-CSRF-Token": token or ""},
    )
    assert created.status == 403


def test_the_viewer_gets_16_bit_pixels_windowed_as_asked(
    logged_in: tuple[BrowserContext, Page], seeded: Seeded
) -> None:
    context, _ = logged_in
    gate = seeded.gate
    path = f"{seeded.base_url}/api/tasks/{gate['tier']}/{gate['image_id']}"
    info = context.request.get(path).json()["image"]
    assert (info["dtype"], info["max_value"], info["width"], info["height"]) == (
        "uint16",
        65535,
        696,
        520,
    )
    pixels = read_image(gate["uri"], roots=[seeded.world.settings.datasets], max_pixels=10**8)
    assert pixels.dtype == np.uint16 and int(pixels.max()) > 255  # real 16-bit content
    for low, high in [(100, 3000), (info["window_low"], info["window_high"])]:
        response = context.request.get(f"{path}/image?low={low}&high={high}")
        assert response.status == 200 and response.headers["content-type"] == "image/png"
        shown = np.asarray(Image.open(io.BytesIO(response.body())))
        assert np.array_equal(shown, window(pixels, low, high)[:, :, 0])
    assert context.request.get(f"{path}/image?low=5&high=70000").status == 422


def test_bad_box_or_missing_csrf_token_is_refused_and_nothing_is_stored(
    logged_in: tuple[BrowserContext, Page], seeded: Seeded
) -> None:
    context, page = logged_in
    spare = seeded.spare_detector
    _open_viewer(page, seeded, spare)
    token = page.locator("meta[name='csrf-token']").get_attribute("content") or ""
    url = f"{seeded.base_url}/api/annotations"
    good_box = {"x_min": 10, "y_min": 10, "x_max": 50, "y_max": 50, "label": "WBC"}
    bad = [
        {**good_box, "x_max": 641},  # past the 640 px edge
        {**good_box, "x_min": 60},  # x_min > x_max
        {**good_box, "label": "Neutrophil"},  # not in the class list
    ]
    for box in bad:
        body = {"image_id": spare["image_id"], "tier": spare["tier"], "boxes": [box]}
        response = context.request.post(
            url,
            data=json.dumps(body),
            headers={"Content-Type": "application/json", "X-CSRF-Token": token},
        )
        assert response.status == 422, response.text()
        assert response.json()["error"] == "validation"
    unknown_tier = context.request.post(
        url,
        data=json.dumps({"image_id": spare["image_id"], "tier": "tier9", "boxes": [good_box]}),
        headers={"Content-Type": "application/json", "X-CSRF-Token": token},
    )
    assert unknown_tier.status == 422
    no_token = context.request.post(
        url,
        data=json.dumps(
            {"image_id": spare["image_id"], "tier": spare["tier"], "boxes": [good_box]}
        ),
        headers={"Content-Type": "application/json"},
    )
    assert no_token.status == 403

    assert annotations_for_image(session=seeded.world.session, image_id=spare["image_id"]) == []
    task = get_task(session=seeded.world.session, image_id=spare["image_id"], tier=spare["tier"])
    assert task is not None and task["status"] != "done"
    assert spare["image_id"] not in _annotation_events(seeded)


def test_an_admin_grants_and_revokes_studies_on_the_users_page(
    browser: Browser, seeded: Seeded
) -> None:
    world = seeded.world
    admin, member = f"adm-{world.prefix[:-1]}", f"mem-{world.prefix[:-1]}"
    for name, role in ((admin, "admin"), (member, "annotator")):
        assert add_user(
            session=world.session,
            username=name,
            password_hash=hash_password(PASSWORD),
            role=role,
            studies=[world.study] if role == "annotator" else [],
        )
    other = f"{world.study}-other"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{seeded.base_url}/login?next=/admin/users")
        page.fill("#username", admin)
        page.fill("#password", PASSWORD)
        page.click("#login-submit")
        expect(page).to_have_url(f"{seeded.base_url}/admin/users")
        row = page.locator(f"#users tr[data-user='{member}']")
        chips = row.locator("ul.studies li[data-study]")
        expect(chips).to_have_count(1)
        expect(row.locator(f"li[data-study='{world.study}']")).to_have_count(1)
        expect(page.locator(f"#users tr[data-user='{admin}'] td").nth(2)).to_have_text(
            "every study (admin)"
        )

        row.locator("input[name='study']").fill(other)
        row.get_by_role("button", name="Grant").click()
        expect(page.locator("#status")).to_contain_text(f"granted {other} to {member}")
        expect(chips).to_have_count(2)
        stored = get_user(session=world.session, username=member)
        assert stored is not None and stored["studies"] == sorted([world.study, other])

        row.get_by_role("button", name=f"revoke {world.study}", exact=True).click()
        expect(page.locator("#status")).to_contain_text(f"revoked {world.study} from {member}")
        expect(chips).to_have_count(1)
        expect(row.locator(f"li[data-study='{other}']")).to_have_count(1)
        row.locator("input[name='all_studies']").check()
        expect(page.locator("#status")).to_contain_text("may now access every study")
        stored = get_user(session=world.session, username=member)
        assert stored is not None and stored["studies"] == [other] and stored["all_studies"]
        expect(row.locator("input[name='all_studies']")).to_be_checked()

        # A bad name is refused with the server's reason, and nothing changes.
        row.locator("input[name='study']").fill("bad\tname")
        row.get_by_role("button", name="Grant").click()
        expect(page.locator("#status")).to_contain_text("is invalid")
        stored = get_user(session=world.session, username=member)
        assert stored is not None and stored["studies"] == [other]
    finally:
        context.close()
