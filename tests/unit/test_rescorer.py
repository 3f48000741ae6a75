"""The re-scoring setting, and which output of an image settles it for a promoted model."""

from __future__ import annotations

from typing import Any

import pytest

from phenocascade.cli.cascade import learning_commands
from phenocascade.consumers.rescorer import RescoreSettings, newest_output_of
from phenocascade.errors import ConfigError


def test_rescoring_is_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHENOCASCADE_RESCORE_ON_PROMOTION", raising=False)
    monkeypatch.delenv("PHENOCASCADE_RESCORE_WAIT_S", raising=False)
    assert RescoreSettings.from_env() == RescoreSettings(on_promotion=False, wait_s=300.0)
    assert "rescorer" not in learning_commands(20)
    monkeypatch.setenv("PHENOCASCADE_RESCORE_ON_PROMOTION", "1")
    monkeypatch.setenv("PHENOCASCADE_RESCORE_WAIT_S", "60")
    assert RescoreSettings.from_env() == RescoreSettings(on_promotion=True, wait_s=60.0)
    assert learning_commands(20, rescore=True)["rescorer"] == ["rescorer"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PHENOCASCADE_RESCORE_ON_PROMOTION", "sometimes"),
        ("PHENOCASCADE_RESCORE_WAIT_S", "0"),
        ("PHENOCASCADE_RESCORE_WAIT_S", "a while"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        RescoreSettings.from_env()
    message = str(caught.value)
    assert message.startswith(f"{variable}={value!r}: ") and "\n" not in message


def _output(versions: dict[str, str], at: int, route: str = "PASS") -> dict[str, Any]:
    return {"model_versions": versions, "produced_at": at, "routes": {"minority": route}}


def test_only_an_output_of_the_promoted_version_settles_an_image() -> None:
    old = _output({"quality": "q1", "minority": "v1"}, 1, "ANNOTATE")
    # An expert's answer to the old model's question comes later, still of the old model.
    answered = _output({"quality": "q1", "minority": "v1"}, 3, "ANNOTATE")
    assert newest_output_of([old, answered], "minority", "v2") is None
    # The gate skipped a later copy: the detector did not see it.
    skipped = _output({"quality": "q1"}, 4)
    assert newest_output_of([old, skipped], "minority", "v2") is None
    new = _output({"quality": "q1", "minority": "v2"}, 5)
    newer = _output({"quality": "q1", "minority": "v2"}, 9, "ANNOTATE")
    assert newest_output_of([newer, old, new], "minority", "v2") is newer
