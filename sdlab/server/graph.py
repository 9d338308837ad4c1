"""ComfyUI API-format workflows: validated as ComfyUI does, then run as a graph.

A workflow maps node ids to `{"class_type", "inputs"}`; an input is a literal or a link
`[node_id, output_index]`. Validation reports errors in ComfyUI's shapes (`error` and per-node
`node_errors`); execution runs only the nodes the output nodes need, each once, dependencies first.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sdlab.offload import devices_emptied_after
from sdlab.server.jobs import Interrupted
from sdlab.server.nodes import NODE_TYPES, Env, Saved

MAX_NODES = 2000  # nodes in one workflow (ComfyUI's largest shared workflows have a few hundred)


@dataclass
class Validation:
    """The outcome of validating a workflow, in ComfyUI's terms."""

    prompt: dict[str, Any]  # the workflow with literal inputs converted to their declared types
    outputs: list[str]  # the output nodes that validated (the ones to run)
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: dict[str, Any] | None = None  # set when nothing can run

    @property
    def ok(self) -> bool:
        """Whether any output can run."""
        return self.error is None


def _error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def validate(prompt: Any, env: Env, max_nodes: int = MAX_NODES) -> Validation:
    """ComfyUI's `validate_prompt`: node types known, outputs present, every needed input valid; at most
    `max_nodes` nodes (checked first, and nothing recurses on the graph's depth)."""
    if not isinstance(prompt, dict):
        return Validation({}, [], error=_error("invalid_prompt", "Prompt must be an object of nodes"))
    if len(prompt) > max_nodes:
        message = f"Prompt has {len(prompt)} nodes; sdlab runs at most {max_nodes} (MAX_NODES)"
        return Validation({}, [], error=_error("invalid_prompt", message, "", max_nodes=max_nodes))
    prompt = copy.deepcopy(prompt)
    for node_id, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(class_type, str):
            message = "Cannot execute because a node is missing the class_type property."
            return Validation(prompt, [], error=_error("invalid_prompt", message, f"Node ID '#{node_id}'"))
        if class_type not in NODE_TYPES:
            message = f"Cannot execute because node {class_type} does not exist."
            return Validation(prompt, [], error=_error("invalid_prompt", message, f"Node ID '#{node_id}'"))
        if not isinstance(node.setdefault("inputs", {}), dict):
            return Validation(
                prompt, [], error=_error("invalid_prompt", "Node inputs must be an object", node_id)
            )
    outputs = sorted((k for k, v in prompt.items() if NODE_TYPES[v["class_type"]].output_node), key=_order)
    if not outputs:
        return Validation(prompt, [], error=_error("prompt_no_outputs", "Prompt has no outputs"))
    checker = _Checker(prompt, env)
    result = Validation(prompt, [o for o in outputs if checker.valid(o)])
    for output in outputs:
        if output not in result.outputs:
            for node_id in checker.upstream(output):
                if checker.reasons.get(node_id):
                    entry = result.node_errors.setdefault(
                        node_id,
                        {
                            "errors": checker.reasons[node_id],
                            "dependent_outputs": [],
                            "class_type": prompt[node_id]["class_type"],
                        },
                    )
                    entry["dependent_outputs"].append(output)
    if not result.outputs:
        details = "\n".join(
            f"{r['message']}: {r['details']}" for node in result.node_errors.values() for r in node["errors"]
        )
        result.error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
    return result


def _order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdecimal() else (1 << 62, node_id)


class _Checker:
    """Validates nodes once each, following links depth first with an explicit stack (cycles are errors)."""

    def __init__(self, prompt: dict[str, Any], env: Env) -> None:
        self.prompt, self.env = prompt, env
        self.results: dict[str, bool] = {}
        self.reasons: dict[str, list[dict[str, Any]]] = {}

    def valid(self, root: str) -> bool:
        """Whether root and every node it links to are valid; a link back into the path is a cycle."""
        path: dict[str, bool] = {}  # the nodes being checked, in order -> whether their links are valid
        stack: list[tuple[str, Iterator[str]]] = []

        def enter(node_id: str) -> None:
            path[node_id] = True
            stack.append((node_id, iter(self._inputs(node_id))))

        if root not in self.results:
            enter(root)
        while stack:
            node_id, links = stack[-1]
            linked = next(links, None)
            if linked is None:
                stack.pop()
                self.results[node_id] = path.pop(node_id) and not self.reasons[node_id]
                if stack:
                    path[stack[-1][0]] &= self.results[node_id]
            elif linked in path:
                cycle = " -> ".join((*path, linked))
                self.reasons[linked].append(_error("dependency_cycle", "Dependency cycle detected", cycle))
                path[node_id] = False
            elif linked in self.results:
                path[node_id] &= self.results[linked]
            else:
                enter(linked)
        return self.results[root]

    def upstream(self, node_id: str) -> list[str]:
        """node_id and every node it links to, each once."""
        seen: dict[str, None] = {}
        stack = [node_id]
        while stack:
            current = stack.pop()
            if current not in seen and current in self.prompt:
                seen[current] = None
                stack.extend(str(v[0]) for v in self.prompt[current]["inputs"].values() if _is_link(v))
        return list(seen)

    def _inputs(self, node_id: str) -> list[str]:
        """Check a node's own inputs (recording its errors); the nodes its well-formed links name."""
        node = self.prompt[node_id]
        errors, linked = self.reasons.setdefault(node_id, []), []
        node_type = NODE_TYPES[node["class_type"]]
        for name, spec in {**node_type.inputs, **node_type.optional}.items():
            if name not in node["inputs"]:
                if name in node_type.optional:
                    continue
                errors.append(
                    _error("required_input_missing", "Required input is missing", name, input_name=name)
                )
                continue
            value = node["inputs"][name]
            if isinstance(value, list):
                error = self._link(name, value, spec)
                if error is None:
                    linked.append(str(value[0]))
                else:
                    errors.append(error)
                continue
            converted, error = _literal(name, value, spec, self.env)
            if error is None:
                node["inputs"][name] = converted
            else:
                errors.append(error)
        if not errors:
            errors.extend(self._custom(node))
        return linked

    def _custom(self, node: dict[str, Any]) -> list[dict[str, Any]]:
        """The node type's own check of its literal inputs, as ComfyUI reports a VALIDATE_INPUTS failure."""
        node_type = NODE_TYPES[node["class_type"]]
        check = node_type.check
        literals = {k: v for k, v in node["inputs"].items() if k in node_type.inputs and not _is_link(v)}
        problems = check(self.env, **literals) if check is not None else {}
        message = "Custom validation failed for node"
        return [
            _error("custom_validation_failed", message, f"{name} - {problem}", input_name=name)
            for name, problem in problems.items()
        ]

    def _link(self, name: str, value: list, spec: tuple[Any, ...]) -> dict[str, Any] | None:
        if len(value) != 2 or str(value[0]) not in self.prompt or not isinstance(value[1], int):
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            return _error("bad_linked_input", message, name, input_name=name, received_value=value)
        outputs = NODE_TYPES[self.prompt[str(value[0])]["class_type"]].outputs
        received = outputs[value[1]] if 0 <= value[1] < len(outputs) else None
        expected = spec[0] if isinstance(spec[0], str) else "COMBO"
        if received != expected:
            details = f"{name}, {received} != {expected}"
            message = "Return type mismatch between linked nodes"
            return _error("return_type_mismatch", message, details, input_name=name, linked_node=value)
        return None


_CONVERT: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def _literal(name: str, value: Any, spec: tuple[Any, ...], env: Env) -> tuple[Any, dict[str, Any] | None]:
    """A literal input converted to its type and checked against its bounds or choices."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if callable(kind):
        choices = kind(env)
        if value in choices:
            return value, None
        listed = f"(list of length {len(choices)})" if len(choices) > 20 else str(choices)
        details = f"{name}: '{value}' not in {listed}"
        return value, _error(
            "value_not_in_list", "Value not in list", details, input_name=name, received_value=value
        )
    if kind not in _CONVERT:
        details = f"{name}: a {kind} input must be linked to a node output"
        return value, _error(
            "invalid_input_type", f"Input must be a link to a {kind}", details, input_name=name
        )
    try:
        if isinstance(value, (dict, list)) or (kind in ("INT", "FLOAT") and isinstance(value, bool)):
            raise TypeError(f"got {type(value).__name__}")
        if kind == "BOOLEAN" and not isinstance(value, bool):  # ComfyUI's bool() makes "false" true
            raise TypeError(f"expected true or false, got {value!r}")
        value = _CONVERT[kind](value)
    except (TypeError, ValueError, OverflowError) as e:
        message = f"Failed to convert an input value to a {kind} value"
        return value, _error("invalid_input_type", message, f"{name}, {value}, {e}", input_name=name)
    if kind == "FLOAT" and not math.isfinite(value):  # NaN passes every min/max comparison
        message = f"Failed to convert an input value to a {kind} value"
        return value, _error(
            "invalid_input_type", message, f"{name}: a finite number, not {value}", input_name=name
        )
    if "min" in options and value < options["min"]:
        message = f"Value {value} smaller than min of {options['min']}"
        return value, _error("value_smaller_than_min", message, name, input_name=name, received_value=value)
    if "max" in options and value > options["max"]:
        message = f"Value {value} bigger than max of {options['max']}"
        return value, _error("value_bigger_than_max", message, name, input_name=name, received_value=value)
    return value, None


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


# ---------------------------------------------------------------------------------------------
# execution


class NodeFailure(Exception):
    """A node raised while running; carries what ComfyUI's execution_error reports."""

    def __init__(self, node_id: str, class_type: str, error: Exception, executed: list[str]) -> None:
        super().__init__(f"{class_type} (node {node_id}): {error}")
        self.node_id, self.class_type, self.error, self.executed = node_id, class_type, error, executed


def execution_order(prompt: dict[str, Any], outputs: list[str]) -> list[str]:
    """The nodes the outputs need, each once, every node after the nodes it links to (depth first, with
    an explicit stack: a long chain of nodes is no recursion)."""
    order: dict[str, None] = {}
    entered: set[str] = set()
    stack = [(output, False) for output in reversed(outputs)]
    while stack:
        node_id, inputs_placed = stack.pop()
        if node_id in order:
            continue
        if inputs_placed:
            order[node_id] = None
            continue
        if node_id in entered:
            raise ValueError(f"node {node_id} depends on itself")  # validation refuses cycles first
        entered.add(node_id)
        stack.append((node_id, True))
        links = [str(v[0]) for v in prompt[node_id]["inputs"].values() if _is_link(v)]
        stack += [(linked, False) for linked in reversed(links)]
    return list(order)


def execute(
    validation: Validation,
    env: Env,
    on_node: Callable[[str], None],
    on_output: Callable[[str, dict[str, Any]], None],
) -> dict[str, dict[str, Any]]:
    """Run a validated workflow; returns node id -> UI output of the output nodes. Under `--offload model`
    the network left on the device goes back at the end, as after `sdlab.pipeline.generate`."""
    prompt = validation.prompt
    values: dict[str, tuple[Any, ...]] = {}
    outputs: dict[str, dict[str, Any]] = {}
    executed: list[str] = []
    with torch.inference_mode(), devices_emptied_after():
        for node_id in execution_order(prompt, validation.outputs):
            node = prompt[node_id]
            if env.live is not None:
                env.live.node = node_id
                env.live.check()
            on_node(node_id)
            node_type = NODE_TYPES[node["class_type"]]
            inputs = {
                name: values[str(v[0])][v[1]] if _is_link(v) else v
                for name, v in node["inputs"].items()
                if name in node_type.inputs or name in node_type.optional
            }
            try:
                result = node_type.run(env, **inputs)
            except Interrupted:
                raise
            except Exception as e:
                raise NodeFailure(node_id, node["class_type"], e, executed) from e
            executed.append(node_id)
            if isinstance(result, Saved):
                outputs[node_id] = result.ui
                on_output(node_id, result.ui)
                result = ()
            values[node_id] = result
    return outputs
