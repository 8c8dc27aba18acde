"""Cohere's `input_type` as one of the model's prompts (the service's EmbedRequest.prompt_name).

Cohere's models embed a search query and a searched document differently, told by `input_type`; a
sentence-transformers model does the same with its named prompts, prepended to each text. Which prompt an input_type
takes is by convention of the prompt names (sentence-transformers' models name them query and document, or query and
passage), or the operator's choice per model (settings.cohere_input_type_prompts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

from gateway import errors

InputType = Literal["search_query", "search_document", "classification", "clustering"]
INPUT_TYPES: tuple[str, ...] = get_args(InputType)

# The prompt names each input_type takes by default: the first of them the model has.
DEFAULT_PROMPTS: dict[str, tuple[str, ...]] = {
    "search_query": ("query",),
    "search_document": ("document", "passage"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}
AS_IS = ""  # the prompt_name that embeds a text as it is


def prompt_name(model: str, input_type: str | None, prompts: Mapping[str, str],
                configured: Mapping[str, Mapping[str, str]]) -> str:
    """The prompt_name for `input_type` on `model`, whose prompts (name -> text) are `prompts`; AS_IS for none.

    sentence-transformers gives every model a "query" and a "document" prompt, empty unless the model has its own, so
    an empty prompt counts as none: of the names an input_type takes, the first whose prompt has text is chosen
    (tiny-bert's "passage" before its empty "document"), and an empty one alone embeds the texts as they are (BGE's
    "document"). A model whose prompts are all empty embeds every text as it is, whatever its input_type; one with
    prompts but none for the input_type is refused (400) rather than given a text without the prompt its training
    expects, unless the operator configured that input_type for it (an empty name: as it is).
    """
    if input_type is None:
        return AS_IS
    chosen = configured.get(model, {}).get(input_type)
    if chosen is not None:
        if chosen == AS_IS or chosen in prompts:
            return chosen
        raise _no_prompt(model, input_type, prompts,
                         f"the gateway's cohere_input_type_prompts names the prompt '{chosen}' for it")
    named = [name for name in DEFAULT_PROMPTS[input_type] if name in prompts]
    with_text = [name for name in named if prompts[name]]
    if with_text:
        return with_text[0]
    if named or not any(prompts.values()):
        return AS_IS
    wanted = " or ".join(f"'{name}'" for name in DEFAULT_PROMPTS[input_type])
    raise _no_prompt(model, input_type, prompts, f"it takes a prompt named {wanted}")


def _no_prompt(model: str, input_type: str, prompts: Mapping[str, str], why: str) -> errors.OpenAIError:
    named = ", ".join(f"'{name}'" for name, text in sorted(prompts.items()) if text) or "none"
    return errors.invalid_request(
        f"input_type '{input_type}' is not served by the model '{model}': {why}, and the model's prompts are {named}",
        "input_type", "no_prompt_for_input_type")
