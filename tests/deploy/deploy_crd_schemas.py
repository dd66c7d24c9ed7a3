"""JSON schemas for the custom resources in deploy/k8s, which kubernetes-validate has no schema for.

Each schema is a stated SUBSET of the upstream CRD's openAPIV3Schema: the fields cellserve's manifests
use, with the upstream names, types, required lists and duration patterns (prometheus-operator
monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule, KEDA keda.sh/v1alpha1 ScaledObject). Every
object is closed (``additionalProperties: false``), so a misspelt or unknown field fails validation
instead of passing silently; a manifest that needs a field not listed here must add it here first.
"""

from __future__ import annotations

from typing import Any

# prometheus-operator's duration pattern (e.g. 30s, 5m, 1h30m, 0).
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": STRING_MAP,
                   "annotations": STRING_MAP},
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                               "values": {"type": "array", "items": {"type": "string"}}},
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA,
                       "spec": spec},
        "additionalProperties": False,
    }


SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "required": ["endpoints", "selector"],
    "properties": {
        "jobLabel": {"type": "string"},
        "selector": LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "properties": {"any": {"type": "boolean"},
                              "matchNames": {"type": "array", "items": {"type": "string"}}},
                              "additionalProperties": False},
        "endpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "scheme": {"enum": ["http", "https"]}, "interval": DURATION,
                               "scrapeTimeout": DURATION, "honorLabels": {"type": "boolean"}},
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
})

PROMETHEUS_RULE = _resource("monitoring.coreos.com/v1", "PrometheusRule", {
    "type": "object",
    "properties": {
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "labels": STRING_MAP,
                    "rules": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["expr"],
                            "properties": {
                                "alert": {"type": "string"},
                                "record": {"type": "string"},
                                "expr": {"type": ["string", "integer"]},
                                "for": DURATION,
                                "keep_firing_for": DURATION,
                                "labels": STRING_MAP,
                                "annotations": STRING_MAP,
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
})

SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", {
    "type": "object",
    "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": {
            "type": "object",
            "required": ["name"],
            "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                           "envSourceContainerName": {"type": "string"}},
            "additionalProperties": False,
        },
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": {"type": "integer", "minimum": 0},
        "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "advanced": {
            "type": "object",
            "properties": {
                "restoreToOriginalReplicaCount": {"type": "boolean"},
                "horizontalPodAutoscalerConfig": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        # Checked by kubernetes-validate through an autoscaling/v2 HPA built from it.
                        "behavior": {"type": "object"},
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["metadata", "type"],
                "properties": {
                    "type": {"type": "string"},
                    "name": {"type": "string"},
                    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                    "metadata": STRING_MAP,
                    "useCachedMetrics": {"type": "boolean"},
                },
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
})

# (apiVersion, kind) -> schema. A custom kind not listed here is an error, never skipped.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}
