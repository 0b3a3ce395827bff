"""Read the console's form fields through the management API's own checks (validate): one set of rules."""

from __future__ import annotations

from typing import Any

from llm_proxy.errors import BadRequest
from llm_proxy.manage.validation import Field, validate, whole_number


def form_text(form: Any, name: str, max_length: int) -> str:
    """A required text field, checked as the API checks it (stripped, not empty, no control characters)."""
    value = form.get(name)
    document = {} if value is None else {name: value if isinstance(value, str) else ""}
    text: str = validate(document, {name: Field(str, required=True, max_length=max_length)})[name]
    return text


def form_int(form: Any, name: str, minimum: int, maximum: int) -> int | None:
    """An optional whole number field: empty means none."""
    value = form.get(name)
    text = value.strip() if isinstance(value, str) else ""
    return whole_number(text, name, minimum=minimum, maximum=maximum, kind="field") if text else None


def form_bool(form: Any, name: str) -> bool:
    """A yes/no field sent by a button: `true` or `false`."""
    value = form.get(name)
    if value not in ("true", "false"):
        raise BadRequest(f"`{name}` must be true or false", param=name)
    return bool(value == "true")
