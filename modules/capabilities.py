"""Capabilities before meaning: what a request needs, what each expert can take, and routing
restricted to the experts that can serve it.

Everything here is a pure function of config and request values. The views call
`restrict_decision` on the router's decision (routers never learn about capabilities), the
expert runner checks the fallback expert before it falls back, and the model catalog reports the
same values in /api/show and /api/tags, so what LeMoE advertises is what it routes by.

An expert that declares no `capabilities` is assumed to take anything, as before this existed:
an old experts.json keeps routing exactly as it did, and the expert's own server keeps deciding
what it accepts. Declaring capabilities is how a user opts in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from modules.chat_types import ChatRequest, RouteDecision
from modules.config_manager import AppConfig, ExpertConfig, LocalModelsConfig
from modules.errors import ContextTooLong, MissingCapability

# Checked in this order, and named in this order in errors and listings.
ROUTING_CAPABILITIES = ("tools", "insert", "vision", "thinking", "json")
# Stands for "the prompt does not fit the expert's context" among missing capabilities.
CONTEXT = "context_length"
# Ollama's own names, in the order `ollama show` prints them. "json" is not one: Ollama applies
# `format` to every model, so it is LeMoE's routing knowledge only and never listed.
OLLAMA_CAPABILITIES = ("completion", "tools", "insert", "vision", "embedding", "thinking")
# Listed for an expert that declares nothing: what LeMoE has always listed. Listing more (vision,
# insert) would make clients start sending images or fill-in-the-middle prompts that the
# expert's server may not take; routing still assumes such an expert takes anything.
UNDECLARED_LISTING = ("completion", "tools")
# Reported as the context window when it is unknown (a remote expert without context_length or
# num_ctx): clients size their prompts by it, so some modest number beats none.
UNKNOWN_CONTEXT_LISTING = 8192
# Ollama counts each image as 768 tokens when it fits a chat into num_ctx (server/prompt.go).
IMAGE_TOKENS = 768
# A cheap estimate, good enough to tell a 2k prompt from a 30k one: about 4 characters a token for
# English and code (fewer for most other scripts, so long non-English prompts are underestimated).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class RequestNeeds:
    """What serving one request takes."""

    # Names from ROUTING_CAPABILITIES.
    capabilities: frozenset[str]
    # Estimated tokens of everything sent to the expert (see `estimate_prompt_tokens`).
    prompt_tokens: int


@dataclass(frozen=True)
class ExpertAbilities:
    """What one expert can take, as declared (or defaulted) in experts.json."""

    expert_id: int
    label: str
    # Declared capabilities; None when the expert declares none (it is assumed to take anything).
    capabilities: frozenset[str] | None
    # Context window in tokens; None when unknown (no limit is assumed).
    context_length: int | None

    def missing_capabilities(self, needs: RequestNeeds) -> tuple[str, ...]:
        if self.capabilities is None:
            return ()
        return tuple(c for c in ROUTING_CAPABILITIES if c in needs.capabilities and c not in self.capabilities)

    def fits(self, needs: RequestNeeds) -> bool:
        return self.context_length is None or needs.prompt_tokens <= self.context_length

    def missing(self, needs: RequestNeeds) -> tuple[str, ...]:
        """What this expert lacks to serve `needs`; () when it can."""
        return self.missing_capabilities(needs) + (() if self.fits(needs) else (CONTEXT,))

    def listed_capabilities(self) -> tuple[str, ...]:
        """The Ollama capability list for /api/show and /api/tags."""
        if self.capabilities is None:
            return UNDECLARED_LISTING
        return tuple(c for c in OLLAMA_CAPABILITIES if c == "completion" or c in self.capabilities)

    def listed_context_length(self) -> int:
        return self.context_length if self.context_length is not None else UNKNOWN_CONTEXT_LISTING


def abilities_of(expert: ExpertConfig, local_models: LocalModelsConfig) -> ExpertAbilities:
    """An expert's capabilities and context window, with the defaults filled in.

    The context window is the declared `context_length`; else, for a local model, the
    `local_models.n_ctx` it is loaded with; else, for an Ollama expert, the `num_ctx` option it is
    sent with (the window the Ollama server then runs it at); else unknown.
    """
    context = expert.context_length
    if context is None and expert.type == "local":
        context = local_models.n_ctx
    if context is None and expert.type == "ollama" and isinstance(expert.options.get("num_ctx"), int):
        context = expert.options["num_ctx"]
    declared = frozenset(expert.capabilities) if expert.capabilities is not None else None
    return ExpertAbilities(expert.id, expert.label, declared, context)


def abilities_from_config(config: AppConfig) -> dict[str, ExpertAbilities]:
    """Every expert's abilities by label, in the order of the experts file."""
    return {e.label: abilities_of(e, config.local_models) for e in config.experts}


def request_needs(request: ChatRequest) -> RequestNeeds:
    """What a request asks of the expert that answers it."""
    needs = set()
    if any(m.images for m in request.messages):
        needs.add("vision")
    if request.tools:
        needs.add("tools")
    if request.format is not None:
        needs.add("json")
    # False (or "none" from OpenAI's reasoning_effort) switches reasoning off, which any model can.
    if request.think is True or (isinstance(request.think, str) and request.think):
        needs.add("thinking")
    if request.kind == "completion" and request.suffix:
        needs.add("insert")
    return RequestNeeds(frozenset(needs), estimate_prompt_tokens(request))


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """Tokens of the prompt, estimated as characters / 4 plus 768 per image.

    Counts what reaches the expert's template: every message's text, reasoning and tool-call
    arguments, the tool definitions, and a fill-in-the-middle suffix. No tokenizer is run: the
    estimate only has to tell which experts' windows a prompt clearly fits.
    """
    chars = len(request.suffix or "")
    images = 0
    for message in request.messages:
        chars += len(message.content) + len(message.thinking or "")
        chars += sum(len(json.dumps(call.arguments)) + len(call.name) for call in message.tool_calls)
        images += len(message.images)
    if request.tools:
        chars += len(json.dumps(request.tools))
    return math.ceil(chars / CHARS_PER_TOKEN) + IMAGE_TOKENS * images


def capable_experts(abilities: Iterable[ExpertAbilities], needs: RequestNeeds) -> dict[str, int]:
    """Label -> id of the experts that can serve `needs`, in the given order."""
    return {a.label: a.expert_id for a in abilities if not a.missing(needs)}


def restrict_decision(decision: RouteDecision, capable: Mapping[str, int], fallback_label: str) -> RouteDecision | None:
    """The router's decision kept to the experts in `capable` (label -> id); None if there are none.

    1. The router's choice, if it can serve the request.
    2. Else the best-scoring capable specialist, if its score beats the fallback expert's own score
       in the same decision (the embedding and classifier routers' "none of these experts" share;
       0 when the router gives the fallback none, as the keyword router does): the router rated it
       a better fit than no specialist at all.
    3. Else the fallback expert, if it can serve the request.
    4. Else the best-scoring capable specialist whatever its score: an expert that can read the
       request is better than refusing it.
    Ties go to the expert listed first. A changed decision has method "capability" and the new
    expert's score.
    """
    if decision.label in capable:
        return decision
    if not capable:
        return None
    scores = decision.scores
    specialists = [label for label in capable if label != fallback_label]
    best = max(specialists, key=lambda label: scores.get(label, 0.0), default=None)
    if best is not None and scores.get(best, 0.0) > scores.get(fallback_label, 0.0):
        return _redirected(decision, best, capable[best])
    if fallback_label in capable:
        return _redirected(decision, fallback_label, capable[fallback_label])
    assert best is not None  # capable is not empty and holds no fallback
    return _redirected(decision, best, capable[best])


def _redirected(decision: RouteDecision, label: str, expert_id: int) -> RouteDecision:
    return replace(decision, expert_id=expert_id, label=label, score=decision.scores.get(label, 0.0),
                   method="capability")


def require_capable(abilities: ExpertAbilities, needs: RequestNeeds, model_name: str) -> None:
    """Refuse a request that names an expert lacking a capability it needs (400, as Ollama does).

    The context window is not checked here: a client that names an expert gets it whatever the
    length, and the expert's server truncates or refuses as it would for any client, since the
    estimate is only an estimate.
    """
    missing = abilities.missing_capabilities(needs)
    if missing:
        raise MissingCapability(unsupported_message(model_name, missing, needs))


def route_capable(decision: RouteDecision, needs: RequestNeeds, abilities: Mapping[str, ExpertAbilities],
                  fallback_label: str, model_name: str) -> RouteDecision:
    """The router's decision restricted to the experts that can serve `needs`, or a 400 naming
    what none of them can take."""
    restricted = restrict_decision(decision, capable_experts(abilities.values(), needs), fallback_label)
    if restricted is not None:
        return restricted
    message = unserved_message(model_name, needs, abilities.values())
    if any(not a.missing_capabilities(needs) for a in abilities.values()):
        raise ContextTooLong(message)
    raise MissingCapability(message)


def unsupported_message(model_name: str, missing: Sequence[str], needs: RequestNeeds,
                        context_length: int | None = None) -> str:
    """Ollama's wording for a model that lacks a capability: `<name> does not support tools`, or
    `"<name>" does not support thinking` (Ollama checks thinking first and quotes the name)."""
    if "thinking" in missing:
        return f'"{model_name}" does not support thinking'
    named = [c for c in missing if c != CONTEXT]
    if named:
        return f"{model_name} does not support {', '.join(named)}"
    return (f"{model_name} has a context of {context_length} tokens, too small for this prompt "
            f"(about {needs.prompt_tokens} tokens)")


def unserved_message(model_name: str, needs: RequestNeeds, abilities: Iterable[ExpertAbilities]) -> str:
    """Why no expert behind `model_name` (the router) can serve `needs`, for the client."""
    experts = list(abilities)
    nobody_has = [c for c in ROUTING_CAPABILITIES
                  if c in needs.capabilities and all(c in a.missing_capabilities(needs) for a in experts)]
    if nobody_has:
        return unsupported_message(model_name, nobody_has, needs)
    able = [a for a in experts if not a.missing_capabilities(needs)]
    if able:
        largest = max(a.context_length or 0 for a in able)
        return unsupported_message(model_name, (CONTEXT,), needs, largest)
    wanted = " and ".join(c for c in ROUTING_CAPABILITIES if c in needs.capabilities)
    return f"{model_name} has no single expert that supports {wanted} together"


def lacking_fallback_message(missing: Sequence[str]) -> str:
    """The 503 message when the chosen expert failed and the fallback cannot take the request."""
    named = [c for c in missing if c != CONTEXT]
    if named:
        return f"no expert that supports {', '.join(named)} is available to answer right now"
    return "no expert with a context large enough for this prompt is available to answer right now"
