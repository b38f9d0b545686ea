"""A DSPy adapter that small chat models can follow.

DSPy's ChatAdapter asks for ``[[ ## field ## ]]`` sections and its JSONAdapter for a JSON object;
a 135M-parameter model produces neither most of the time, so nearly every call fails to parse.
`SmallModelAdapter` asks for nothing the model cannot do:

- the system message is the signature's instructions, verbatim (omitted when blank), so an
  instruction optimizer changes exactly what the model reads first;
- the user message holds the inputs as ``Field: value`` lines (``Question: ...``);
- with one output field the whole reply is its value; if a line of the reply starts with the
  field's label (``Answer: 12``), the value is what follows the label instead. Non-text fields
  (``int``, ``float``, ...) are parsed from that text, and numbers fall back to its last number;
- with several output fields the user message ends by asking for one ``Field: value`` line per
  output field. The reply is split at lines that start with a field's label (markdown emphasis
  around the label is tolerated); a value runs until the next label, and a label seen a second
  time ends the answer (small models repeat themselves). A last output field the
  model did not label receives the whole reply; any other text field it skipped is left empty;
  a skipped non-text field is a parse error;
- demos (few-shot examples) become earlier user/assistant turns in the same layout, and a
  ``dspy.History`` input becomes earlier turns too.

An empty reply is an empty (probably wrong) answer for text fields, not a parse error.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import dspy
from dspy.adapters.utils import format_field_value, parse_value
from dspy.signatures.signature import Signature
from dspy.utils.exceptions import AdapterParseError
from pydantic.fields import FieldInfo

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def field_label(name: str, field: FieldInfo) -> str:
    """The label a field is written with: DSPy's prefix without its colon (``question`` -> ``Question``).

    Args:
        name: The field name.
        field: The field's info from the signature.

    Returns:
        The label.
    """
    prefix = (field.json_schema_extra or {}).get("prefix")
    if isinstance(prefix, str) and prefix.strip().rstrip(":").strip():
        return prefix.strip().rstrip(":").strip()
    return name.replace("_", " ").strip().capitalize()


def _label_pattern(labels: dict[str, str]) -> re.Pattern[str]:
    # A line that starts with a known label: "Answer: 8", "**Answer:** 8", "- answer: 8".
    names = "|".join(re.escape(label) for label in sorted(set(labels), key=len, reverse=True))
    return re.compile(rf"^[\s>*_#\-]*({names})[\s*_]*:[\s*_]*(.*)$", re.IGNORECASE)


def _is_text(field: FieldInfo) -> bool:
    return field.annotation is str


class SmallModelAdapter(dspy.Adapter):
    """Plain prompts and lenient parsing for small chat models (see the module docstring).

    Use it wherever a small model runs a DSPy program:
    ``dspy.configure(lm=local_lm(), adapter=SmallModelAdapter())``, or
    ``with dspy.context(adapter=SmallModelAdapter()): ...``.

    Args:
        callbacks: DSPy callbacks run around `format` and `parse`.
    """

    def __init__(self, callbacks: list | None = None):
        super().__init__(callbacks=callbacks)

    # --- formatting ---------------------------------------------------------------------------

    def format(
        self, signature: type[Signature], demos: list[dict[str, Any]], inputs: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The chat messages: instructions as the system message, demos as prior turns, then the inputs."""
        messages = super().format(signature, demos, inputs)
        if messages and messages[0]["role"] == "system" and not messages[0]["content"].strip():
            messages = messages[1:]
        return messages

    def format_system_message(self, signature: type[Signature]) -> str:
        """The signature's instructions, verbatim."""
        return self.format_task_description(signature)

    def format_task_description(self, signature: type[Signature]) -> str:
        """The signature's instructions, stripped."""
        return (signature.instructions or "").strip()

    def format_field_description(self, signature: type[Signature]) -> str:
        """Fields are not described to the model: their labels are the description."""
        return ""

    def format_field_structure(self, signature: type[Signature]) -> str:
        """The answer layout requested in the user message (empty for one output field)."""
        return self.output_request(signature)

    def output_request(self, signature: type[Signature]) -> str:
        """The sentence asking for one ``Field: value`` line per output field; empty for a single output.

        Args:
            signature: The signature being formatted.

        Returns:
            The request, or ``""`` when the signature has one output field.
        """
        fields = signature.output_fields
        if len(fields) < 2:
            return ""
        lines = [f"{field_label(name, field)}: ..." for name, field in fields.items()]
        return "Reply in this form:\n" + "\n".join(lines)

    def format_user_message_content(
        self,
        signature: type[Signature],
        inputs: dict[str, Any],
        prefix: str = "",
        suffix: str = "",
        main_request: bool = False,
    ) -> str:
        """Inputs as ``Field: value`` lines, followed on the main request by `output_request`."""
        parts = [prefix.strip()] if prefix.strip() else []
        lines = [
            f"{field_label(name, field)}: {format_field_value(field_info=field, value=inputs[name])}"
            for name, field in signature.input_fields.items()
            if name in inputs
        ]
        if lines:
            parts.append("\n".join(lines))
        if main_request:
            request = self.output_request(signature)
            if request:
                parts.append(request)
        if suffix.strip():
            parts.append(suffix.strip())
        return "\n\n".join(parts)

    def format_assistant_message_content(
        self, signature: type[Signature], outputs: dict[str, Any], missing_field_message: str | None = None
    ) -> str:
        """A demo's answer as the model should write it: the bare value, or ``Field: value`` lines."""
        fields = signature.output_fields
        present = {name: field for name, field in fields.items() if outputs.get(name) is not None}
        if len(fields) == 1:
            name, field = next(iter(fields.items()))
            if name not in present:
                return missing_field_message or ""
            return str(format_field_value(field_info=field, value=outputs[name]))
        return "\n".join(
            f"{field_label(name, field)}: {format_field_value(field_info=field, value=outputs[name])}"
            for name, field in present.items()
        )

    def format_demos(self, signature: type[Signature], demos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each demo with every input and at least one output becomes a user turn and an assistant turn."""
        messages: list[dict[str, Any]] = []
        for demo in demos:
            if not all(demo.get(name) is not None for name in signature.input_fields):
                logger.debug("Skipping a demo without all input fields: %s", demo)
                continue
            if not any(demo.get(name) is not None for name in signature.output_fields):
                logger.debug("Skipping a demo without output fields: %s", demo)
                continue
            messages.append({"role": "user", "content": self.format_user_message_content(signature, demo)})
            messages.append({"role": "assistant", "content": self.format_assistant_message_content(signature, demo)})
        return messages

    # --- parsing ------------------------------------------------------------------------------

    def parse(self, signature: type[Signature], completion: str) -> dict[str, Any]:
        """Map the reply to the output fields (see the module docstring for the rules).

        Args:
            signature: The signature being answered.
            completion: The model's reply.

        Returns:
            A value for every output field.

        Raises:
            AdapterParseError: A non-text field could not be read from the reply.
        """
        fields = signature.output_fields
        names = list(fields)
        sections = self._labeled_sections(signature, completion)
        values: dict[str, Any] = {}
        for name in names:
            if name in sections:
                raw = sections[name]
            elif name == names[-1]:
                raw = completion  # the model skipped the labels: the whole reply answers the last field
            elif _is_text(fields[name]):
                raw = ""
            else:
                raise AdapterParseError(
                    adapter_name=type(self).__name__,
                    signature=signature,
                    lm_response=completion,
                    parsed_result=values,
                    message=f"The reply has no line for the field {name!r}.",
                )
            values[name] = self._convert(signature, name, raw.strip(), completion)
        return values

    def _labeled_sections(self, signature: type[Signature], completion: str) -> dict[str, str]:
        labels: dict[str, str] = {}
        for name, field in signature.output_fields.items():
            labels[field_label(name, field).lower()] = name
            labels[name.lower()] = name
        pattern = _label_pattern(labels)
        sections: dict[str, list[str]] = {}
        current: str | None = None
        for line in completion.splitlines():
            match = pattern.match(line)
            if match:
                name = labels[match.group(1).lower()]
                if name in sections:  # a repeated label ends the answer (small models loop)
                    current = None
                    continue
                current = name
                sections[name] = [match.group(2)]
            elif current is not None:
                sections[current].append(line)
        return {name: "\n".join(lines) for name, lines in sections.items()}

    def _convert(self, signature: type[Signature], name: str, raw: str, completion: str) -> Any:
        field = signature.output_fields[name]
        if _is_text(field):
            return raw
        try:
            return parse_value(raw, field.annotation)
        except Exception as exc:
            if field.annotation in (int, float):
                numbers = _NUMBER.findall(raw)
                if numbers:
                    number = float(numbers[-1].replace(",", ""))
                    if field.annotation is float:
                        return number
                    if number.is_integer():
                        return int(number)
            raise AdapterParseError(
                adapter_name=type(self).__name__,
                signature=signature,
                lm_response=completion,
                message=f"Could not read the field {name!r} as {field.annotation}: {exc}",
            ) from exc

    def _call_postprocess(
        self,
        processed_signature: type[Signature],
        original_signature: type[Signature],
        outputs: list[dict[str, Any] | str],
        lm: Any,
        lm_kwargs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        # DSPy rejects an empty reply before `parse` sees it. For text fields it is just an empty
        # answer, which the metric scores; a blank stands in for it so `parse` maps it to "".
        if all(_is_text(field) for field in processed_signature.output_fields.values()):
            outputs = [_blank_if_empty(output) for output in outputs]
        return super()._call_postprocess(processed_signature, original_signature, outputs, lm, lm_kwargs)


def _blank_if_empty(output: dict[str, Any] | str | None) -> dict[str, Any] | str:
    if isinstance(output, dict):
        if output.get("text") or output.get("tool_calls"):
            return output
        return {**output, "text": " "}
    return output or " "
